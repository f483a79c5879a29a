"""FP32 model in, measured and signed INT8 bundle out.

Every input is checked before any work starts (the model, the data against the
model's inputs, the signing key), all intermediate files live in a temporary
folder, and the bundle is written by rename at the very end: a failed conversion
leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from agent import __version__, detections, reference
from agent.bundle import REFERENCE, Manifest, MemoryCost, SelfTest, write_bundle
from agent.errors import ConversionError
from agent.signing import load_private_key

from . import guard, measure, stateful
from .data import MIN_CALIBRATION_SAMPLES, Labels, check_labels, load_dataset, preprocessing_of, read_labels
from .nms import check_feed, parse_nms
from .onnx_graph import lift_constants, model_bytes, name_nodes, upgrade_opset
from .onnx_int8 import describe, load_onnx
from .prune import prune_unstructured
from .prune_channels import prune_channels
from .targets import FORMATS, OnnxTarget, TfliteTarget

REFERENCE_SAMPLES = 8
REFERENCE_MAX_BYTES = 256 * 1024  # self-test data must not outweigh the model: fewer samples for big inputs
STATEFUL_REFERENCE_STEP = 7  # a stateful model's self-test runs this step of the stream: its state is not zeros
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    name: str | None = None
    version: int = 1
    per_channel: bool = True
    method: str = "minmax"
    exclude_nodes: list[str] = field(default_factory=list)
    threads: int = 1
    description: str = ""
    precision: str = "int8"          # int8 (static QDQ), int8-dynamic, or fp32 (ship the float model)
    max_drop: float | None = None    # accuracy guard: search until the quality loss is within this
    allow_worse: bool = False        # ship INT8 even when it is larger or slower than FP32
    prune: float | None = None       # unstructured magnitude pruning to this sparsity, before quantizing
    prune_scope: str = "global"      # global (over all layers' weights) or layer (each layer alike)
    prune_channels: float | None = None  # structured: remove this share of conv output channels first
    compress: str | None = None      # "xz" compresses the bundle; the default is xz for pruned models
    format: str = "onnx"             # onnx, tflite, or both (one bundle each)
    full_range_weights: bool = False  # ONNX: 8-bit weights (7-bit by default, exact on every CPU)
    tflite_int8_io: bool = False     # TFLite: int8 model inputs/outputs instead of float ones
    preprocess: str | None = None    # how image-folder data become input tensors (agent/images.py)
    max_images: int | None = None    # images read from a folder (default: 512 to calibrate, 1000 to evaluate)
    labels: str | None = None        # a label file naming the classes by output index (data.read_labels)
    nms: str | None = None           # append non-maximum suppression to a YOLO detector (converters/nms.py)
    state: dict[str, str] = field(default_factory=dict)         # recurrent state: input -> the output feeding it
    fixed_inputs: dict[str, str] = field(default_factory=dict)  # inputs made constants (a sample rate, a flag)
    context: dict[str, int] = field(default_factory=dict)       # samples of a window carried into the next
    cut_at: list[str] = field(default_factory=list)  # tensors the model ends at (before a tail TFLite cannot map)


PRECISIONS = ("int8", "int8-dynamic", "fp32")


def _top1_needed(outputs) -> float:
    """The board's self-test asks every answer's top class to match where the outputs are class
    scores ([batch, classes]); a map (a detector's [batch, 1, H, W]) has no top class, and near
    ties along its last axis would flip between runtimes: its bound is the error tolerance alone."""
    return 1.0 if all(len(o.shape) == 2 for o in outputs) else 0.0


def _named_copy(model_path: Path, out: Path) -> Path:
    """The FP32 model with every node named (exporters often leave names empty), so layers can
    be kept in float by name and reports can point at them, its weights as initializers
    (which are what the quantizer quantizes), and at opset 13 or newer (per-channel QDQ)."""
    import onnx

    model, upgraded = upgrade_opset(onnx.load(str(model_path)))
    renamed, lifted = name_nodes(model), lift_constants(model)
    if not (renamed or lifted or upgraded):
        return model_path
    onnx.save(model, str(out))
    return out


def _model_name(name: str | None, path: Path) -> str:
    raw = name or path.stem
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", raw).strip("-._")[:64]
    if not clean:
        raise ConversionError(f"cannot make a model name from {raw!r}", "pass --name NAME")
    return clean


def _reference_indices(outputs: np.ndarray, k: int) -> np.ndarray:
    """Samples for the board's self-test: for classifiers, ones with a clear top-1 margin,
    so a legitimate last-bit difference between CPUs cannot flip the winning class."""
    n = len(outputs)
    if outputs.ndim == 2 and outputs.shape[1] > 1 and n > k:
        top2 = np.sort(outputs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        clear = np.flatnonzero(margin >= np.median(margin))
        return clear[:k]
    return np.arange(min(n, k))


def _bundle_paths(out_path: Path, fmt: str) -> dict[str, Path]:
    """Where each format's bundle goes: the path given, or NAME-onnx.ewb and NAME-tflite.ewb for both."""
    if fmt != "both":
        return {fmt: out_path}
    return {f: out_path.with_name(f"{out_path.stem}-{f}.ewb") for f in ("onnx", "tflite")}


def convert_onnx(model_path: str | Path, calibration: str | Path, out_path: str | Path,
                 key_path: str | Path | None = None, evaluation: str | Path | None = None,
                 options: ConvertOptions | None = None, progress: Progress | None = None) -> dict:
    """Quantize an FP32 ONNX model to INT8 ONNX and/or INT8 TFLite (or keep FP32), measure each
    against FP32, write a bundle per format. With max_drop, search for settings within that loss.
    For --format both the report is the TFLite one, with the ONNX one under "also"."""
    opts = options or ConvertOptions()
    say = progress or (lambda stage, done, total: None)
    model_path, out_path = Path(model_path), Path(out_path)
    _check_options(opts, out_path)
    nms = parse_nms(opts.nms) if opts.nms else None
    key = load_private_key(key_path) if key_path else None
    name = _model_name(opts.name, model_path)
    paths = _bundle_paths(out_path, opts.format)

    with tempfile.TemporaryDirectory(prefix="edgeward-convert-") as tmp:
        work = Path(tmp)
        if opts.fixed_inputs or opts.cut_at:  # part of the FP32 model that everything is measured against
            model_path = _edited(model_path, opts, work / "edited.onnx")
        if nms and opts.format == "onnx":  # the FP32 model with the same suppression is the reference
            model_path = _with_nms(model_path, nms, work / "nms.onnx")
        model = load_onnx(model_path)
        inputs, outputs = describe(model)
        if opts.state:
            stateful.check_state(opts.state, inputs, outputs)
        opts.context = stateful.check_context(opts.context, opts.state, inputs)  # as numbers of samples
        calib, evalset = load_data(calibration, evaluation, stateful.data_specs(inputs, opts.state, opts.context),
                                   opts, say)
        source = _named_copy(model_path, work / "named.onnx")
        pruning, channels = None, None
        if opts.prune_channels:
            say("removing channels", 0, 1)
            channels = prune_channels(source, work / "channels.onnx", opts.prune_channels)
            source = work / "channels.onnx"
            say("removing channels", 1, 1)
        if opts.prune:
            say("pruning", 0, 1)
            pruning = prune_unstructured(source, work / "pruned.onnx", opts.prune, opts.prune_scope)
            source = work / "pruned.onnx"
            say("pruning", 1, 1)
        ref_out = measure.run_all(as_stream(measure.session(model_path, opts.threads), opts, inputs),
                                  evalset.inputs, what="the FP32 model")
        reports = {}
        for fmt in ("tflite", "onnx"):
            if fmt not in paths:
                continue
            sub = work / fmt
            sub.mkdir()
            calib_feeds = calib.inputs
            # each sample with the state the FP32 model reached (and, for TFLite, each window as the model
            # takes it, with its context: the shapes its free axes are fixed to)
            if opts.state and (opts.precision == "int8" or fmt == "tflite"):
                calib_feeds = stateful.steps(as_stream(measure.session(model_path), opts, inputs), calib.inputs)
            if fmt == "onnx":
                target = OnnxTarget(sub, source, model_path, bool(pruning or channels), calib_feeds, say,
                                    reduce_range=not opts.full_range_weights, nms=nms)
            else:
                target = TfliteTarget(sub, source, calib_feeds, say, int8_io=opts.tflite_int8_io,
                                      original=model_path if pruning or channels else None, nms=nms)
            target_ref = ref_out
            if fmt == "tflite" and nms:  # measured against the float model with the same suppression
                check_feed(next(iter(ref_out.values())), target.fp32_path, target.graph, evalset.inputs)
                target_ref = measure.run_all(target.fp32_session(opts.threads), evalset.inputs,
                                             what="the float model with --nms")
            reports[fmt] = _finish(target, name, opts, calib, evalset, evaluation is not None, target_ref, pruning,
                                   model_path, paths[fmt], key, say)
            reports[fmt]["channel_pruning"] = channels
    first = reports.pop("tflite") if "tflite" in reports else reports.pop("onnx")
    if reports:
        first["also"] = next(iter(reports.values()))
    return first


def _with_nms(model_path: Path, spec, out: Path) -> Path:
    """A copy of a YOLO ONNX model ending in non-maximum suppression (converters/nms.py)."""
    import onnx

    from .nms import append_to_onnx

    onnx.save(append_to_onnx(onnx.load(str(model_path)), spec), str(out))
    return out


def _edited(model_path: Path, opts: ConvertOptions, out: Path) -> Path:
    """A copy of the model whose named inputs are constants (--fix-input sr=16000) and which
    ends at the tensors named (--cut-at)."""
    import onnx

    from .onnx_graph import cut_at, fix_inputs

    model = onnx.load(str(model_path))
    if opts.fixed_inputs:
        fix_inputs(model, opts.fixed_inputs)
    if opts.cut_at:
        cut_at(model, opts.cut_at)
    onnx.save(model, str(out))
    return out


def as_stream(session, opts: ConvertOptions, inputs: list):
    """A stateful model's session runs the samples as one stream (converters/stateful.py)."""
    if not opts.state:
        return session
    return stateful.StreamSession(session, opts.state, stateful.zero_state(inputs, opts.state), opts.context)


def load_data(calibration, evaluation, inputs, opts: ConvertOptions, say: Progress):
    """(calibration, evaluation) datasets: .npz files or image folders (through opts.preprocess)."""
    calib = load_dataset(calibration, inputs, "calibration", MIN_CALIBRATION_SAMPLES, opts.preprocess, say,
                         opts.max_images)
    evalset = load_dataset(evaluation, inputs, "evaluation", 1, opts.preprocess, say, opts.max_images) \
        if evaluation else calib
    if opts.preprocess and not (calib.image or evalset.image):
        raise ConversionError("--preprocess describes image files, but the data given are .npz arrays",
                              "drop --preprocess, or pass folders of images as --calibration/--eval")
    return calib, evalset


def _check_options(opts: ConvertOptions, out_path: Path) -> None:
    if opts.version < 1:
        raise ConversionError(f"--version {opts.version}: versions start at 1")
    if out_path.suffix != ".ewb":
        raise ConversionError(f"output {out_path} should end in .ewb", "name the bundle like model.ewb")
    if opts.precision not in PRECISIONS:
        raise ConversionError(f"precision {opts.precision!r} is unknown", f"use one of {', '.join(PRECISIONS)}")
    if opts.format not in FORMATS:
        raise ConversionError(f"format {opts.format!r} is unknown", f"use one of {', '.join(FORMATS)}")
    if opts.format != "onnx" and opts.precision == "int8-dynamic":
        raise ConversionError("dynamic INT8 is an onnxruntime feature; TFLite here is full-integer INT8",
                              "use --format onnx with --precision int8-dynamic, or --precision int8")
    if opts.max_drop is not None and not 0 <= opts.max_drop < 1:
        raise ConversionError(f"--max-drop {opts.max_drop}: give a fraction, e.g. 0.01 for one point")
    for flag, value in (("--prune", opts.prune), ("--prune-channels", opts.prune_channels)):
        if value is not None and not 0 < value < 1:
            raise ConversionError(f"{flag} {value}: give a fraction between 0 and 1, e.g. 0.5")
    if opts.state and opts.prune_channels:
        raise ConversionError("--prune-channels does not reach through recurrent state", "leave it out with --state")
    if opts.max_images is not None and opts.max_images < 1:
        raise ConversionError(f"--max-images {opts.max_images}: give a number of images, e.g. 500")
    if opts.labels:
        read_labels(opts.labels)  # a label file that cannot be read fails before any model is loaded
    if opts.nms:
        parse_nms(opts.nms)
        if opts.format == "both":
            raise ConversionError("--nms appends another suppression to each format's model: convert once per "
                                  "format", "run edgeward convert with --format tflite, then with --format onnx")


def _run_once(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _latency_note(latency: dict, name: str) -> str:
    """Why a TFLite model's latency is shown but not judged on an x86 host."""
    ratio = latency["int8"]["p50"] / latency["fp32"]["p50"]
    board = f"time it on the board (edgeward bench --model {name}) before judging"
    if ratio <= 1.0:
        return f"INT8 vs FP32 latency measured on {platform.machine()}, not on the board: {board}"
    return (f"INT8 ran {ratio:.2f}x as long as FP32 on this {platform.machine()} host, where XNNPACK's int8 "
            "kernels often trail its float ones (without VNNI, and in layers with few channels even with it); "
            f"TFLite models are judged on ARM hosts only: {board}")


def _finish(target, name: str, opts: ConvertOptions, calib, evalset, held_out: bool, ref_out: dict, pruning,
            model_path: Path, out_path: Path, key, say: Progress, labels: Labels | None = None) -> dict:
    """Quantize for one target (searching when asked), measure, and write its bundle. `labels`:
    class names the model file itself carries (--labels, if given, wins)."""
    preprocessing, labels_note = preprocessing_of(evalset, calib), None
    if opts.labels:  # checked against what the float model answers before any quantizing
        labels = read_labels(opts.labels)
        check_labels(labels, ref_out, target.detections)
    elif labels:  # the model file's own: where they do not fit, the model converts unnamed
        try:
            check_labels(labels, ref_out, target.detections)
        except ConversionError as exc:
            labels, labels_note = None, f"{exc.message}: not used (name the classes with --labels)"
    if labels:
        preprocessing["classes"] = labels.names

    def quality_of(s: guard.Settings) -> dict:
        target.build(opts.precision, s)
        candidate = target.session(threads=opts.threads)
        if opts.state:  # (the specs, read from the candidate's file, give the stream's zero state)
            candidate = as_stream(candidate, opts, target.specs()[0])
        return measure.compare(ref_out, measure.run_all(candidate, evalset.inputs, what=f"the {opts.precision} model"),
                               evalset.labels, target.detections)

    settings = guard.Settings(opts.per_channel, "dynamic" if opts.precision == "int8-dynamic" else opts.method,
                              list(opts.exclude_nodes))
    attempts: list[guard.Attempt] = []
    if opts.max_drop is not None and opts.precision != "fp32":
        settings, _, attempts = guard.search(settings, quality_of, opts.max_drop, target.layers(),
                                             calibrated=opts.precision == "int8", methods=target.methods,
                                             progress=say)
        # the search returns on the attempt that succeeded: the target's file already holds that model
    else:
        target.build(opts.precision, settings)
    q_inputs, q_outputs = target.specs()
    int8_raw = target.session(threads=opts.threads)
    int8 = as_stream(int8_raw, opts, q_inputs)
    say("measuring quality", 0, 3)
    q_out = measure.run_all(int8, evalset.inputs)
    quality = measure.compare(ref_out, q_out, evalset.labels, target.detections)
    quality["evaluated_on"] = "evaluation data" if held_out else "calibration data (pass --eval for held-out data)"
    say("measuring latency", 1, 3)
    latency_batch = measure.fixed_batch(int8) or 1  # a model whose batch size is fixed runs whole batches
    sample = {k: np.resize(v[:latency_batch], (latency_batch, *v.shape[1:])) for k, v in evalset.inputs.items()}
    fp32_raw = target.fp32_session(opts.threads)
    latency = measure.latency_ms({"fp32": as_stream(fp32_raw, opts, q_inputs), "int8": int8}, sample)
    say("measuring memory", 2, 3)
    memory = target.memory(stateful.steps(int8, sample)[0] if opts.state else sample, opts.threads)
    say("measuring memory", 3, 3)

    first_out = next(s.name for s in q_outputs if s.name not in opts.state.values())
    if opts.state:  # one step of the stream, fed the state the model had reached by then
        step = stateful.steps(int8, evalset.take(slice(0, STATEFUL_REFERENCE_STEP + 1)))[-1]
        stored, snapped = reference.encode(step, target.input_grids())
        ref_inputs, expected = snapped, _run_once(int8_raw, snapped)
        fp32_expected = _run_once(fp32_raw, snapped)
    else:
        row_bytes = sum(v[:1].nbytes for v in evalset.inputs.values()) + 2 * sum(v[:1].nbytes for v in q_out.values())
        n_ref = max(1, min(REFERENCE_SAMPLES, REFERENCE_MAX_BYTES // row_bytes))
        idx = _reference_indices(q_out[first_out], n_ref) if not target.detections else \
            np.argsort(-q_out[target.detections[3]].reshape(len(q_out[first_out]), -1)[:, 0], kind="stable")[:n_ref]
        # float inputs the model quantizes first travel as 8-bit codes; the outputs are those on the snapped values
        stored, snapped = reference.encode({k: v[idx] for k, v in evalset.inputs.items()}, target.input_grids())
        ref_inputs, expected = target.board_io(int8, snapped, measure.run_all(int8, snapped))
        fp32_expected = measure.run_all(fp32_raw, snapped)
    if target.detections:  # the rows past each image's count are unwritten: stored as zeros, and named
        expected = detections.cleaned(expected, target.detections)
        fp32_expected = detections.cleaned(fp32_expected, target.detections)
    ref_arrays = dict(stored)
    if target.detections:
        ref_arrays[detections.KEY] = np.array(target.detections)
        ref_arrays[detections.THRESHOLD_KEY] = np.float32(target.detection_threshold)
    for k, v in ref_inputs.items():
        if f"input_scale.{k}" not in stored:  # no grid: as the board feeds it (int8 for an int8-I/O model)
            ref_arrays[f"input.{k}"] = v
    ref_arrays.update({f"expected.{k}": v for k, v in expected.items()})
    ref_arrays.update({f"fp32.{k}": v for k, v in fp32_expected.items()})
    # the tolerance scales with each output's range (over the whole stream for a stateful model's one step)
    outs = q_out if opts.state else expected
    tolerances = {k: reference.tolerance(v) for k, v in outs.items() if k in expected}
    ref_arrays.update({f"atol.{k}": np.float32(v) for k, v in tolerances.items()})
    ref_path = target.path.with_name(REFERENCE)
    np.savez(ref_path, **ref_arrays)
    # the manifest's one tolerance is the widest output's: what agents that predate per-output
    # tolerances (reference.npz's atol.NAME) hold every output to
    atol = max(tolerances.values())

    source_bytes = model_bytes(model_path)
    sizes = {"fp32_bytes": model_bytes(target.fp32_path), "int8_bytes": target.path.stat().st_size}
    sizes["int8_vs_fp32"] = round(sizes["int8_bytes"] / sizes["fp32_bytes"], 4)
    wrong = guard.broken(quality) if opts.precision != "fp32" else None
    if wrong and not opts.allow_worse:
        raise ConversionError(f"the {opts.precision} {target.format} model is broken, so it is not shipped: {wrong}",
                              "look for a layer whose output calibration saw as all zero, keep it in float with "
                              "--exclude-node, ship --precision fp32, or pass --allow-worse")
    worse = guard.worse_than_fp32(sizes, latency, judge_latency=target.judges_latency()) \
        if opts.precision != "fp32" else None
    if worse and not opts.allow_worse:
        raise ConversionError(f"the {opts.precision} {target.format} model is {worse} than its FP32 source, so it "
                              "is not shipped",
                              "ship the float model with --precision fp32, or pass --allow-worse to ship it anyway")
    latency_note = None if target.judges_latency() or opts.precision == "fp32" else _latency_note(latency, name)
    search = {"max_drop": opts.max_drop, "chosen": settings.label(),
              "attempts": [{"settings": a.settings.label(), "drop": a.drop, "note": a.note} for a in attempts]} \
        if attempts else None
    model_file = f"model{target.suffix}"
    manifest = Manifest(
        name=name, version=opts.version, format=target.format, model_file=model_file, runtime=target.runtime,
        precision=opts.precision, inputs=q_inputs, outputs=q_outputs, state=dict(opts.state),
        context=dict(opts.context),
        memory=MemoryCost(load_mb=memory["load_mb"], runtime_mb=memory["runtime_mb"],
                          measured_on=memory["measured_on"]),
        selftest=SelfTest(atol=round(atol, 6), min_top1_agreement=_top1_needed(q_outputs)),
        quality={**quality, "latency_p50_ms_fp32": latency["fp32"]["p50"],
                 "latency_p50_ms_int8": latency["int8"]["p50"], **sizes,
                 "source_bytes": source_bytes, "peak_rss_mb": memory["peak_mb"],
                 "calibration": f"{settings.label()}, {len(calib)} samples"
                                if opts.precision == "int8" else opts.precision,
                 **({"accuracy_search": search} if search else {}),
                 **({"shipped_although": " and ".join(w for w in (wrong, worse) if w)} if wrong or worse else {})},
        description=opts.description, preprocessing=preprocessing,
        sparsity=pruning["sparsity"] if pruning else 0.0,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        producer=f"edgeward {__version__} ({target.producers[opts.precision]})",
    )
    say("packing", 0, 1)
    compress = opts.compress if opts.compress is not None else ("xz" if pruning else None)
    write_bundle(out_path, manifest, {model_file: target.path, REFERENCE: ref_path}, key,
                 compress=compress if compress != "none" else None)
    say("packing", 1, 1)
    return {"bundle": str(out_path), "name": name, "version": opts.version, "signed": key is not None,
            "format": target.format, "runtime": target.runtime,
            "precision": opts.precision, "settings": settings.label(), "search": search, "worse_than_fp32": worse,
            "broken": wrong,
            "latency_note": latency_note, "pruning": pruning,
            "bundle_vs_fp32": round(out_path.stat().st_size / sizes["fp32_bytes"], 4),
            "bundle_bytes": out_path.stat().st_size, **sizes, "source_bytes": source_bytes,
            "quality": quality, "latency_ms": latency, "latency_batch": latency_batch, "memory": memory,
            "graph": target.summary(),
            "calibration_samples": len(calib), "evaluation_samples": len(evalset),
            "data": {"calibration": calib.source, "evaluation": evalset.source},
            "preprocessing": manifest.preprocessing, "labels_from": labels.source if labels else None,
            "labels_note": labels_note,
            "state": dict(opts.state), "context": dict(opts.context),
            "fixed_inputs": dict(opts.fixed_inputs)}
