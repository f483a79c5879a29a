#!/usr/bin/env python3
"""MediaPipe's float TFLite models through the converter: which convert, their size and latency.

The table in docs/CONVERTER.md ("Float TFLite models as MediaPipe ships them") comes from this
script. MediaPipe 0.10.14 ships its graphs' models inside its wheel (mediapipe/modules/*/*.tflite,
most with float16 weights); edgeward does not depend on it and this script never imports it, so
installing it without its dependencies is enough:

    .venv/bin/pip install --no-deps mediapipe==0.10.14
    .venv/bin/python scripts/bench_mediapipe.py          # ~3 min on 2 cores

or point `--models DIR` at a folder of .tflite files.

Nothing is downloaded. Each model is calibrated on 24 random images of its input size and
timed at batch 1, 1 thread, FP32 and INT8 in turns (the converter's own measurement). Random
images say nothing of accuracy, so no error is reported: this measures what converts and how
fast it runs, not how well; calibrate on your own images for that.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.tables import format_table  # noqa: E402


def _installed_models() -> Path | None:
    """mediapipe/modules of an installed mediapipe, found without importing it."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "modules"
    return path if path.is_dir() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="a folder of float .tflite files (default: mediapipe/modules "
                                                "of an installed mediapipe)")
    args = ap.parse_args()
    folder = args.models or _installed_models()
    files = sorted(folder.rglob("*.tflite")) if folder and folder.is_dir() else []
    if not files:
        print("bench_mediapipe: no .tflite models: install mediapipe==0.10.14 (see this script's docstring) "
              "or pass --models DIR", file=sys.stderr)
        return 2
    from agent.errors import ConversionError
    from agent.runtimes.tflite import interpreter_class
    from converters.convert import ConvertOptions
    from converters.from_tflite import convert_tflite
    from converters.tflite_graph import op_counts

    cls, _ = interpreter_class()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeward-mediapipe-") as tmp:
        work = Path(tmp)
        for path in files:
            print(f"converting {path.name} ...", file=sys.stderr, flush=True)
            inputs = cls(model_path=str(path)).get_input_details()
            shape = "x".join(str(int(d)) for d in inputs[0]["shape"][1:])
            rng = np.random.default_rng(0)
            np.savez(work / "calib.npz", **{d["name"]: rng.random((24, *d["shape"][1:])).astype(np.float32)
                                            for d in inputs})
            halves = op_counts(path)["tensor_dtypes"].get("float16", 0)
            try:
                r = convert_tflite(path, work / "calib.npz", work / f"{path.stem}.ewb", None, None,
                                   ConvertOptions(name="m", allow_worse=True))
            except ConversionError as exc:
                rows.append([path.name, shape, "yes" if halves else "no", f"refused: {exc.message}", "", "", "", "",
                             ""])
                continue
            lat = r["latency_ms"]
            rows.append([path.name, shape, "yes" if halves else "no", "converted", f"{r['fp32_bytes'] / 1024:.0f}",
                         f"{r['int8_bytes'] / 1024:.0f}", f"{lat['fp32']['p50']:.2f}", f"{lat['int8']['p50']:.2f}",
                         f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x"])
    print(f"{len(files)} float TFLite models from {folder}; batch 1, 1 thread, this CPU\n")
    print(format_table(["model", "input", "float16 weights", "result", "FP32 kB", "INT8 kB", "FP32 ms", "INT8 ms",
                        "INT8/FP32"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
