#!/usr/bin/env python3
"""PP-OCRv4's text recogniser through the converter, both formats, side by side.

The numbers in docs/CONVERTER.md ("Transformers and text recognition") come from this script.
It needs the recogniser as the `rapidocr-onnxruntime` package ships it, which edgeward does not
depend on. Only the model file is read (the package is never imported), so installing it
without its dependencies is enough:

    .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4
    .venv/bin/python scripts/bench_ocr.py            # ~1 min on 2 cores

or pass the file itself with `--model ch_PP-OCRv4_rec_infer.onnx`.

Nothing is downloaded. The text lines are rendered here with Pillow's own font (48x320, dark
text at random sizes and places on white): 32 calibrate, 32 others are read. FP32 is the
reference: a line reads the same when its CTC decoding (the top class per step, repeats
merged, blanks dropped) is identical; the character mismatch is 1 - difflib's ratio of the
decoded sequences, averaged over the lines.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.tables import format_table  # noqa: E402

REC = "ch_PP-OCRv4_rec_infer.onnx"
WORDS = ["Hello World 2026", "edgeward v1.0", "RASPBERRY PI 5", "Jetson Orin Nano", "invoice #4471",
         "total: 12.50 EUR", "quantize me", "abc def ghi", "OCR on a board", "MQTT broker up"]


def _installed_model() -> Path | None:
    """The recogniser inside an installed rapidocr-onnxruntime, found without importing it."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / REC
    return path if path.exists() else None


def _lines(n: int, seed: int) -> np.ndarray:
    """Rendered text lines as PP-OCR's recogniser takes them: [n, 3, 48, 320] in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.new("L", (320, 48), 255)
        font = ImageFont.load_default(size=int(rng.integers(22, 32)))
        ImageDraw.Draw(img).text((int(rng.integers(2, 20)), int(rng.integers(2, 10))), WORDS[i % len(WORDS)],
                                 fill=int(rng.integers(0, 80)), font=font)
        a = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
        out.append(np.repeat(a[None], 3, 0))
    return np.stack(out).astype(np.float32)


def _decode(probabilities: np.ndarray) -> list[tuple[int, ...]]:
    """CTC's greedy decoding: the top class per step, repeats merged, blanks (class 0) dropped."""
    lines = []
    for row in probabilities.argmax(-1):
        kept = [int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        lines.append(tuple(kept))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help=f"the recogniser's ONNX file (default: {REC} of an installed "
                                               "rapidocr-onnxruntime)")
    args = ap.parse_args()
    source = args.model or _installed_model()
    if source is None or not source.exists():
        print(f"bench_ocr: no {REC}: install rapidocr-onnxruntime (see this script's docstring) or pass --model",
              file=sys.stderr)
        return 2
    import tarfile

    import onnxruntime as ort

    from converters.convert import ConvertOptions, convert_onnx
    from converters.measure import TfliteSession, run_all

    with tempfile.TemporaryDirectory(prefix="edgeward-ocr-") as tmp:
        work = Path(tmp)
        np.savez(work / "calib.npz", x=_lines(32, seed=0))
        lines = _lines(32, seed=1)
        np.savez(work / "eval.npz", x=lines)
        want = _decode(ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": lines})[0])
        rows = []
        for fmt in ("tflite", "onnx"):
            bundle = work / f"rec-{fmt}.ewb"
            r = convert_onnx(source, work / "calib.npz", bundle, None, work / "eval.npz",
                             ConvertOptions(name="rec", format=fmt, allow_worse=True))
            with tarfile.open(bundle) as tar:
                (work / f"model.{fmt}").write_bytes(tar.extractfile(f"model.{fmt}").read())
            if fmt == "tflite":
                int8 = TfliteSession(work / "model.tflite")
                got = run_all(int8, {"x": lines})[int8.get_outputs()[0].name]
            else:
                got = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"]).run(
                    None, {"x": lines})[0]
            read = _decode(got)
            same = np.mean([a == b for a, b in zip(want, read)])
            mismatch = np.mean([1 - difflib.SequenceMatcher(None, a, b).ratio() for a, b in zip(want, read)])
            lat = r["latency_ms"]
            rows.append([fmt, r["runtime"], f"{r['fp32_bytes'] / 1024:.0f}", f"{r['int8_bytes'] / 1024:.0f}",
                         f"{r['int8_vs_fp32']:.2f}x", f"{lat['fp32']['p50']:.2f}", f"{lat['int8']['p50']:.2f}",
                         f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x", f"{r['quality']['top1_agreement']:.1%}",
                         f"{same:.0%}", f"{mismatch:.1%}"])
    print(f"PP-OCRv4 recogniser ({source.name}), 48x320 lines, batch 1, 1 thread; calibrated on 32 rendered "
          "lines, read on 32 others\n")
    print(format_table(["format", "runtime", "FP32 kB", "INT8 kB", "size", "FP32 ms", "INT8 ms", "latency",
                        "steps agreeing", "lines read the same", "characters differing"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
