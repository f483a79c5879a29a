"""`edgeward convert`: the command line of the converter (reached through agent.cli by name)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.errors import EdgewardError
from agent.tables import format_table

TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".pt2")

EPILOG = """\
data files (.npz): one array per model input, named like the input (a single-input model
takes any one array), first axis = samples; optional `labels` (integer class ids).
image folders (an image model's one input): .jpg/.png/... files, labelled by sub-folder
(cat/, dog/ -> 0, 1) or unlabelled, prepared as --preprocess says; the bundle records the
spec so the board's `edgeward infer --model NAME --input photos/` prepares images the same way.
  --preprocess unit | signed | imagenet | raw, then key=value overrides: scale=1/255,
  mean=0.5 or mean=0.485:0.456:0.406, std=..., color=rgb|bgr|gray,
  resize=stretch|crop|letterbox, size=HxW (default: the model's), layout=nchw|nhwc,
  jpeg=scaled|full (scaled, the default: large JPEGs decode at 1/2-1/8 scale, 2x faster)

examples:
  edgeward keys gen keys/signing
  edgeward convert model.onnx --calibration calib.npz --eval eval.npz \\
      --name digits --version 2 --key keys/signing.key -o digits-v2.ewb
  edgeward convert model.onnx --calibration calib.npz --eval eval.npz --format both \\
      --max-drop 0.01 --key keys/signing.key -o digits.ewb      # digits-onnx.ewb + digits-tflite.ewb
  edgeward convert model.keras --calibration calib.npz --tflite-io int8 -o net.ewb       # INT8 TFLite
  edgeward convert model.pt2 --calibration calib.npz --prune-channels 0.25 --format tflite -o small.ewb
  edgeward convert mobilenet.onnx --calibration photos/ --eval val/ --preprocess imagenet -o cam.ewb
  edgeward convert silero_vad.onnx --calibration chunks.npz --precision fp32 --fix-input sr=16000 \\
      --state state=stateN --context input=64 -o vad.ewb     # per-stream state on the board

sources, the layers each format maps, install sizes: docs/CONVERTER.md
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeward convert", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Quantize an FP32 model to INT8 ONNX (static QDQ with per-channel weights, or dynamic) "
                    "and/or INT8 TFLite (full-integer but for a transformer's LayerNorms, kept in float), "
                    "measure it against the original, and pack a signed bundle for the agent. A quantized model "
                    "that is larger or slower than FP32 is refused unless --allow-worse; --max-drop searches "
                    "for settings that keep the accuracy.")
    p.add_argument("model", help="FP32 model: .onnx; PyTorch as TorchScript (.pt/.pth/.ts) or an exported "
                                 "program (.pt2), inputs named like the calibration arrays; Keras (.keras/.h5) or a "
                                 "SavedModel folder (needs edgeward[tensorflow]); a float .tflite (float32 or float16 "
                                 "weights, dense or sparse). Keras, SavedModel "
                                 "and .tflite sources become TFLite")
    p.add_argument("--calibration", required=True, metavar="NPZ|DIR",
                   help="representative inputs (>= 16; a few hundred is better): an .npz, or a folder of images")
    p.add_argument("--eval", metavar="NPZ|DIR",
                   help="held-out inputs (+ labels) to measure quality on (default: the calibration data)")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="how image files become the input tensor, e.g. imagenet or unit,resize=crop (needed with "
                        "image folders; see below)")
    p.add_argument("--max-images", type=int, metavar="N",
                   help="read at most N images of a folder, evenly spread over it (default: 512 for calibration, "
                        "1000 for evaluation)")
    p.add_argument("--labels", metavar="TXT",
                   help="class names by output index, one per line or \"INDEX NAME\" lines (a detector's label map, "
                        "e.g. labelmap.txt); answers on the board then name the class. An image folder's "
                        "sub-folders name them otherwise")
    p.add_argument("--nms", metavar="SPEC",
                   help="append non-maximum suppression to a detector, so the board answers with boxes, classes and "
                        "scores: yolo (YOLOv8/v5u/v11 as ultralytics exports them; score=0.25,iou=0.7,max=100) or "
                        "mediapipe (MediaPipe's face, palm and pose detectors, .tflite; strides=8:16:16:16, "
                        "score=0.5,iou=0.3)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle to write (.ewb)")
    p.add_argument("--key", metavar="FILE", help="ed25519 private key to sign with (from `edgeward keys gen`)")
    p.add_argument("--name", help="model name on the device (default: the file name)")
    p.add_argument("--version", type=int, default=1, help="model version; each deploy must be newer (default %(default)s)")
    p.add_argument("--format", choices=["onnx", "tflite", "both"], default="onnx",
                   help="onnx: INT8 ONNX for onnxruntime (default); tflite: INT8 TFLite for "
                        "ai-edge-litert / tflite-runtime; both: one bundle of each (NAME-onnx.ewb, NAME-tflite.ewb)")
    p.add_argument("--tflite-io", choices=["float", "int8"], default="float",
                   help="TFLite model inputs/outputs: float (quantized inside the model; default) or int8 "
                        "(callers quantize with the scale/zero point in the manifest)")
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation calibration method (default %(default)s)")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor instead of per channel")
    p.add_argument("--full-range-weights", action="store_true",
                   help="ONNX: 8-bit weights instead of 7-bit; onnxruntime's x86 kernels without VNNI saturate with "
                        "them, so use it only for boards and hosts with VNNI or ARM dot-product kernels")
    p.add_argument("--state", action="append", default=[], metavar="IN=OUT",
                   help="recurrent state (voice activity detection, keyword spotting): on the board each stream "
                        "feeds input IN what output OUT returned on its last call, zeros at first; the data's "
                        "samples are then one stream, in order (repeatable; with --format tflite the recurrent "
                        "layers are unrolled, one frame a call)")
    p.add_argument("--context", action="append", default=[], metavar="NAME=K",
                   help="audio windows that overlap: on the board each stream puts the last K samples of its "
                        "last window in front of the next one, along input NAME's last axis, so callers send "
                        "only new samples (Silero VAD: --context input=64); needs --state (repeatable)")
    p.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE",
                   help="make an input of fixed shape a constant, e.g. a sample rate: --fix-input sr=16000; "
                        "callers then leave it out (repeatable; ONNX sources)")
    p.add_argument("--cut-at", action="append", default=[], metavar="TENSOR",
                   help="end the model at this tensor, which becomes an output; what follows it is dropped: a "
                        "tail the TFLite writer does not map (TopK, non-maximum suppression), left for the board "
                        "to do (repeatable, one per output; ONNX and TFLite sources)")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME", help="keep this node in float (repeatable)")
    p.add_argument("--precision", choices=["int8", "int8-dynamic", "fp32"], default="int8",
                   help="int8: static, calibrated (default); int8-dynamic: int8 weights, activations quantized at "
                        "run time (transformer/RNN-like models); fp32: ship the float model as it is")
    p.add_argument("--max-drop", type=float, metavar="FRACTION",
                   help="accuracy guard: search calibration settings and layers kept in float until top-1 accuracy "
                        "(or agreement with FP32, without labels) drops by at most this, e.g. 0.01; fail otherwise")
    p.add_argument("--allow-worse", action="store_true",
                   help="ship INT8 even when it is larger or slower than FP32 here, or its answers are off by more "
                        "than a tenth of the output's range on average (refused by default)")
    p.add_argument("--prune", type=float, metavar="SPARSITY",
                   help="zero this share of the smallest weights before quantizing (e.g. 0.5); the bundle is then "
                        "xz-compressed, where the zeros cost next to nothing")
    p.add_argument("--prune-channels", type=float, metavar="FRACTION",
                   help="structured pruning: remove this share of each convolution's output channels (lowest L1 "
                        "first) with the matching inputs of the next layer, so the model gets smaller and faster")
    p.add_argument("--prune-scope", choices=["global", "layer"], default="global",
                   help="rank weights over all layers together (default) or within each layer")
    p.add_argument("--compress", choices=["xz", "none"], help="bundle compression (default: xz when pruning)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads for latency measurement (default %(default)s)")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.add_argument("--json", action="store_true", help="print the report as JSON only")
    return p


def _progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r  {stage}: {done}/{total}   ", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    elif done >= total:
        print(f"  {stage}: done", file=sys.stderr, flush=True)


def render_report(r: dict) -> str:
    q, lat = r["quality"], r["latency_ms"]
    fmt = "TFLite" if r.get("format") == "tflite" else "ONNX"
    rows = [[f"model file ({fmt})", f"{r['fp32_bytes'] / 1024:.1f} kB", f"{r['int8_bytes'] / 1024:.1f} kB",
             f"{r['int8_vs_fp32']:.2f}x"],
            [f"latency p50 (batch {r.get('latency_batch', 1)}, this CPU, {r.get('runtime', 'onnxruntime')})", f"{lat['fp32']['p50']:.3f} ms", f"{lat['int8']['p50']:.3f} ms",
             f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x"]]
    if "accuracy_fp32" in q:
        rows.append(["top-1 accuracy", f"{q['accuracy_fp32']:.2%}", f"{q['accuracy_int8']:.2%}",
                     f"{-q['accuracy_drop_pp']:+.2f} pp"])
    label = {"int8": "INT8", "int8-dynamic": "INT8 dyn", "fp32": "shipped"}[r.get("precision", "int8")]
    table = format_table(["", "FP32", label, f"{label} vs FP32"], rows, align="lrrr")
    lines = [f"{r['name']} v{r['version']} -> {r['bundle']} ({r['bundle_bytes'] / 1024:.1f} kB, "
             f"{'signed' if r['signed'] else 'UNSIGNED: boards refuse it unless allow_unsigned'})", "", table, ""]
    if "top1_agreement" in q:
        where = f"{q['positions']} positions of {q['samples']} samples" if "positions" in q else f"{q['samples']} samples"
        lines.append(f"top-1 agreement with FP32: {q['top1_agreement']:.2%} of {where} ({q['evaluated_on']})")
    if "detection_agreement" in q:
        lines.append(f"detections matching FP32's (same class, IoU >= 0.5): {q['detection_agreement']:.2%} "
                     f"({q['detections_matched']} matched; FP32 found {q['detections_fp32']}, "
                     f"{label} {q['detections_int8']} in {q['samples']} images, {q['evaluated_on']})")
        lines.append(f"matched detections: mean IoU {q['matched_iou_mean']:.3f}, "
                     f"scores within {q['matched_score_max_err']:.4g}")
    else:
        worst = f"; the worst of the outputs: {q['worst_output']}" if q.get("worst_output") else ""
        lines.append(f"output error vs FP32: max {q['max_abs_err']:.4g}, mean {q['mean_abs_err']:.4g} "
                     f"(output range {q['output_range']:.4g}{worst})")
    lines.append(f"memory on load: {r['memory']['load_mb']:.1f} MB + runtime import {r['memory']['runtime_mb']:.1f} MB "
                 f"(peak RSS of a process that loads and runs it: {r['memory'].get('peak_mb', 0):.1f} MB)")
    pre = r.get("preprocessing") or {}
    if pre.get("image"):
        from agent.images import describe

        lines.append("images: " + describe(pre["image"], None if r.get("labels_from") else pre.get("classes")) +
                     " (stored in the bundle: the board prepares images the same way)")
        if r.get("data"):
            lines.append(f"data: calibration {r['data']['calibration']}, evaluation {r['data']['evaluation']}")
    if r.get("labels_from"):  # a label map rather than image sub-folders
        from agent.images import describe_classes

        lines.append(f"labels: {describe_classes(pre['classes'])}, from {r['labels_from']} (stored in the bundle)")
    if r.get("labels_note"):
        lines.append(f"labels: {r['labels_note']}")
    if r.get("search"):
        lines.append(f"accuracy search (--max-drop {r['search']['max_drop']:g}): chose {r['search']['chosen']} "
                     f"after {len(r['search']['attempts'])} attempt(s)")
    if r.get("pruning"):
        lines.append(f"pruning: {r['pruning']['sparsity']:.1%} of the weights are zero ({r['pruning']['scope']}); "
                     f"bundle {r['bundle_bytes'] / 1024:.1f} kB = {r['bundle_vs_fp32']:.2f}x the FP32 file")
    if r.get("channel_pruning"):
        c = r["channel_pruning"]
        lines.append(f"channel pruning: {len(c['layers'])} convolution(s), {c['channels_before']} -> "
                     f"{c['channels_after']} channels")
    if r.get("state"):
        lines.append("state: " + ", ".join(f"{i} <- {o}" for i, o in r["state"].items()) +
                     " (kept per stream on the board; the data's samples were measured as one stream, in order)")
    if r.get("context"):
        lines.append("context: " + ", ".join(f"{k} gets the last {n} samples of its last window in front"
                                             for k, n in r["context"].items()) +
                     " (on the board, per stream: callers send only new samples)")
    if r.get("fixed_inputs"):
        lines.append("fixed inputs: " + ", ".join(f"{k} = {v}" for k, v in r["fixed_inputs"].items()) +
                     " (constants in the shipped model: callers leave them out)")
    if r.get("broken"):
        lines.append(f"WARNING: shipped although {r['broken']} (--allow-worse)")
    if r.get("worse_than_fp32"):
        lines.append(f"WARNING: shipped although it is {r['worse_than_fp32']} than FP32 (--allow-worse)")
    for note in [r.get("latency_note")] + r.get("notes", []):
        if note:
            lines.append(f"note: {note}")
    ops = r["graph"]["ops"]
    weights = r["graph"].get("int8_weight_tensors", r["graph"].get("int8_initializers"))
    if r.get("format") == "tflite":
        dtypes = r["graph"]["tensor_dtypes"]
        lines.append("graph: " + ", ".join(f"{n} {k}" for k, n in sorted(ops.items())) + "; tensors: " +
                     ", ".join(f"{n} {k}" for k, n in sorted(dtypes.items())))
    elif r.get("precision") == "int8-dynamic":  # no Q/DQ pairs: integer ops that quantize as they run
        integer = {k: n for k, n in ops.items() if "Integer" in k or "Quantize" in k}
        lines.append(f"graph: {weights} int8 weight tensors; integer ops: " +
                     (", ".join(f"{k} {n}" for k, n in sorted(integer.items())) or "none"))
    else:
        lines.append(f"graph: {ops.get('QuantizeLinear', 0)} QuantizeLinear, {ops.get('DequantizeLinear', 0)} "
                     f"DequantizeLinear, {weights} int8 weight tensors")
    if r.get("also"):
        lines += ["", render_report(r["also"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = _options(args)
        report = _convert(args, opts)
    except EdgewardError as exc:
        print(f"edgeward convert: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0


def _options(args: argparse.Namespace):
    from .convert import ConvertOptions
    from .stateful import parse_pairs

    return ConvertOptions(name=args.name, version=args.version, per_channel=not args.per_tensor, method=args.method,
                          exclude_nodes=args.exclude_node, threads=args.threads, description=args.description,
                          precision=args.precision, max_drop=args.max_drop, allow_worse=args.allow_worse,
                          prune=args.prune, prune_scope=args.prune_scope, prune_channels=args.prune_channels, compress=args.compress,
                          format=args.format, tflite_int8_io=args.tflite_io == "int8",
                          full_range_weights=args.full_range_weights, preprocess=args.preprocess,
                          max_images=args.max_images, labels=args.labels, nms=args.nms,
                          state=parse_pairs(args.state, "--state", "h=h_out"),
                          fixed_inputs=parse_pairs(args.fix_input, "--fix-input", "sr=16000"),
                          context=parse_pairs(args.context, "--context", "input=64"), cut_at=args.cut_at)


def _convert(args: argparse.Namespace, opts) -> dict:
    """The source's converter, chosen by what the model file is."""
    from .convert import convert_onnx
    from .from_tensorflow import convert_tensorflow, is_tensorflow_source

    common = dict(key_path=args.key, evaluation=args.eval, options=opts, progress=None if args.json else _progress)
    if (opts.state or opts.fixed_inputs or opts.context) and not args.model.endswith(".onnx"):
        raise EdgewardError("--state, --context and --fix-input work on ONNX files",
                            "export the model to ONNX first (torch.onnx.export, tf2onnx) and convert the .onnx file")
    if opts.cut_at and not args.model.endswith((".onnx", ".tflite")):
        raise EdgewardError("--cut-at works on ONNX and TFLite files",
                            "convert the model to .tflite or .onnx first and cut that file")
    if args.model.endswith(".tflite"):
        from .from_tflite import convert_tflite

        return convert_tflite(args.model, args.calibration, args.output, **common)
    if is_tensorflow_source(args.model):
        return convert_tensorflow(args.model, args.calibration, args.output, **common)
    if args.model.endswith(TORCH_SUFFIXES):
        from .from_torch import convert_torch, example_from_npz, load_torch_file

        opts.name = opts.name or Path(args.model).stem
        if Path(args.calibration).is_dir():
            raise EdgewardError("image folders need the model's input shape, which a PyTorch file does not "
                                "give before it is exported",
                                "export it to ONNX first (torch.onnx.export), or pass the data as .npz")
        return convert_torch(load_torch_file(args.model), example_from_npz(args.calibration), args.calibration,
                             args.output, **common)
    return convert_onnx(args.model, args.calibration, args.output, **common)

