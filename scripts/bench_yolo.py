#!/usr/bin/env python3
"""YOLOv8n through the converter, whole and cut at its heads, both formats, side by side; then
with its non-maximum suppression appended (--nms yolo), what that costs and what it finds.

The numbers in docs/CONVERTER.md ("YOLOv8 detectors, whole") come from this script. It needs
the `ultralytics` package, which edgeward does not depend on: install it into a separate
environment that can also import edgeward's, for example

    python3 -m venv /tmp/ulvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ulvenv/lib/python3.11/site-packages/edgeward.pth
    /tmp/ulvenv/bin/pip install --no-deps ultralytics "torchvision==0.28.*"   # the one matching .venv's torch
    /tmp/ulvenv/bin/pip install opencv-python-headless matplotlib pillow requests tqdm polars ultralytics-thop
    PYTHONPATH=. /tmp/ulvenv/bin/python scripts/bench_yolo.py [--size 320]

Nothing is downloaded: the network is built from ultralytics' yolov8n.yaml with random weights,
and its batch-norm statistics are taken from random images (an untrained network's activations
otherwise die out before the heads, which then put out their biases alone). Trained weights
would give other errors, not other sizes or latencies. The error of the whole model is split
into box centres (x, y), box sizes (w, h), both in pixels, and class scores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.tables import format_table  # noqa: E402


def _yolov8n_onnx(folder: Path, size: int, class_bias: float | None = None) -> Path:
    """ultralytics' YOLOv8n as `yolo export format=onnx opset=13` writes it, random weights.
    `class_bias`: the class heads' bias (ultralytics starts it near -10, so an untrained
    network scores every anchor near 0 and finds nothing; 0 gives scores around 0.5, detections
    to suppress and match)."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)  # the same random network on every run
    model = YOLO("yolov8n.yaml")
    net = model.model
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    net.train()
    with torch.no_grad():
        for batch in np.array_split(_images(32, size, seed=1), 4):
            net(torch.from_numpy(batch))
    net.eval()
    if class_bias is not None:
        for head in net.model[-1].cv3:
            head[-1].bias.data[:] = class_bias
    exported = Path(model.export(format="onnx", imgsz=size, opset=13, simplify=False, dynamic=False))
    return Path(shutil.move(str(exported), folder / f"yolov8n{'' if class_bias is None else '-scoring'}.onnx"))


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images in [0, 1] (blocks of 8x8 pixels), NCHW float32."""
    low = np.random.default_rng(seed).random((n, 3, size // 8, size // 8)).astype(np.float32)
    return np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)


def _errors(reference: np.ndarray, candidate: np.ndarray) -> dict[str, str]:
    """Mean and 99th-percentile error of box centres, box sizes and class scores."""
    out = {}
    for part, rows in (("x, y px", slice(0, 2)), ("w, h px", slice(2, 4)), ("scores", slice(4, None))):
        err = np.abs(reference[:, rows] - candidate[:, rows])
        out[part] = f"{err.mean():.3g} / {np.percentile(err, 99):.3g}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=320, help="input height and width (default %(default)s)")
    args = ap.parse_args()
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        print("bench_yolo: the ultralytics package is not installed; see this script's docstring for how",
              file=sys.stderr)
        return 2
    import tarfile

    import onnxruntime as ort

    from agent.signing import generate_keypair
    from converters.convert import ConvertOptions, convert_onnx
    from converters.measure import TfliteSession

    with tempfile.TemporaryDirectory(prefix="edgeward-yolo-") as tmp:
        work = Path(tmp)
        source = _yolov8n_onnx(work, args.size)
        key, _, _ = generate_keypair(work / "signing")
        calib, evaluation = _images(32, args.size, seed=2), _images(8, args.size, seed=3)
        np.savez(work / "calib.npz", images=calib)
        np.savez(work / "eval.npz", images=evaluation)
        fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        want = np.concatenate([fp32.run(None, {"images": x[None]})[0] for x in evaluation])
        heads = [f"/model.22/cv{k}.{i}/cv{k}.{i}.2/Conv_output_0" for i in range(3) for k in (2, 3)]
        rows = []
        for what, cut in (("whole", []), ("heads only", heads)):
            for fmt in ("tflite", "onnx"):
                bundle = work / f"{fmt}-{len(cut)}.ewb"
                r = convert_onnx(source, work / "calib.npz", bundle, key, work / "eval.npz",
                                 ConvertOptions(name="yolov8n", format=fmt, allow_worse=True, cut_at=cut))
                q, lat = r["quality"], r["latency_ms"]
                errors = {"x, y px": "", "w, h px": "", "scores": ""}
                if not cut:
                    with tarfile.open(bundle) as tar:
                        (work / f"model.{fmt}").write_bytes(tar.extractfile(f"model.{fmt}").read())
                    int8 = TfliteSession(work / "model.tflite") if fmt == "tflite" else \
                        ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
                    got = np.concatenate([int8.run(None, {"images": x[None]})[0] for x in evaluation])
                    errors = _errors(want, got)
                if what == "whole" and fmt == "tflite":
                    whole_int8_ms = lat["int8"]["p50"]
                rows.append([what, fmt, f"{r['fp32_bytes'] / 1024:.0f}", f"{r['int8_bytes'] / 1024:.0f}",
                             f"{r['int8_bytes'] / r['fp32_bytes']:.2f}x", f"{lat['fp32']['p50']:.2f}",
                             f"{lat['int8']['p50']:.2f}", f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x",
                             f"{q['max_abs_err']:.3g} / {q['mean_abs_err']:.3g}", *errors.values()])
        nms_rows = []
        scoring = _yolov8n_onnx(work, args.size, class_bias=0.0)
        for model, spec in ((source, "yolo"), (scoring, "yolo"), (scoring, "yolo,score=0.6")):
            r = convert_onnx(model, work / "calib.npz", work / "nms.ewb", key, work / "eval.npz",
                             ConvertOptions(name="yolov8n", format="tflite", allow_worse=True, nms=spec))
            q, lat = r["quality"], r["latency_ms"]
            what = "as above" if model == source else "class bias 0"
            nms_rows.append([f"{what}, --nms {spec}", f"{r['int8_bytes'] / 1024:.0f}", f"{lat['fp32']['p50']:.2f}",
                             f"{lat['int8']['p50']:.2f}", f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x",
                             f"{lat['int8']['p50'] - whole_int8_ms:+.2f}", q["detections_fp32"], q["detections_int8"],
                             f"{q['detection_agreement']:.1%}", f"{q['matched_iou_mean']:.3f}"])
    print(f"YOLOv8n (ultralytics {ultralytics.__version__}, random weights), {args.size}x{args.size}, batch 1, "
          "1 thread; calibrated on 32 images, measured on 8\n")
    print(format_table(["model", "format", "FP32 kB", "INT8 kB", "size", "FP32 ms", "INT8 ms", "latency",
                        "worst output max / mean err", "x, y px mean / p99", "w, h px mean / p99",
                        "scores mean / p99"], rows))
    print("\nWith the suppression appended (TFLite; FP32 is the float model with the same suppression):\n")
    print(format_table(["model", "INT8 kB", "FP32 ms", "INT8 ms", "latency", "INT8 ms vs whole",
                        "FP32 detections", "INT8 detections", "matched", "matched IoU"], nms_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
