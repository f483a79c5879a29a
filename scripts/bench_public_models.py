#!/usr/bin/env python3
"""Models that ship inside PyPI packages, through the converter to INT8 TFLite: which convert,
their size and latency.

The tables in docs/CONVERTER.md ("Float TFLite models as MediaPipe ships them", "Wake words")
come from this script. Two packages ship edge models inside their wheels: MediaPipe 0.10.14
(mediapipe/modules/*/*.tflite: face, hand and pose models, most with float16 weights) and
openWakeWord 0.4.0 (openwakeword/resources/models/*.onnx: its speech embedding and wake-word
heads). edgeward depends on neither and this script imports neither, so installing them without
their dependencies is enough:

    .venv/bin/pip install --no-deps mediapipe==0.10.14 openwakeword==0.4.0
    .venv/bin/python scripts/bench_public_models.py      # ~2 min on 2 cores

or point `--models DIR` (repeatable) at any folder of .tflite and .onnx files.

Nothing is downloaded. Each model is calibrated on 24 random inputs of its input shape and
timed at batch 1, 1 thread, FP32 and INT8 in turns (the converter's own measurement). Random
inputs say nothing of accuracy, so no error is reported: this measures what converts and how
fast it runs, not how well; calibrate on your own data for that.
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


PACKAGES = {"mediapipe": "modules", "openwakeword": "resources/models"}  # package -> its models' folder


def _installed_folders() -> list[Path]:
    """The model folders of the installed packages above, found without importing them."""
    found = []
    for package, sub in PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / sub
            if path.is_dir():
                found.append(path)
    return found


def _shape_of(path: Path) -> list[tuple[str, list[int]]]:
    """(name, shape) of each input, a free batch as 1, other free axes refused (no data to fix them)."""
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        weights = {i.name for i in model.graph.initializer}
        return [(i.name, [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim])
                for i in model.graph.input if i.name not in weights]
    from agent.runtimes.tflite import interpreter_class

    return [(d["name"], [int(v) for v in d["shape_signature"]]) for d in
            interpreter_class()[0](model_path=str(path)).get_input_details()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, action="append", help="a folder of float .tflite and .onnx files "
                    "(repeatable; default: the model folders of an installed mediapipe and openwakeword)")
    args = ap.parse_args()
    folders = args.models or _installed_folders()
    files = sorted(f for folder in folders if folder.is_dir() for f in folder.rglob("*")
                   if f.suffix in (".tflite", ".onnx"))
    if not files:
        print("bench_public_models: no .tflite or .onnx models: install mediapipe==0.10.14 and openwakeword==0.4.0 "
              "(see this script's docstring) or pass --models DIR", file=sys.stderr)
        return 2
    from agent.errors import ConversionError
    from converters.convert import ConvertOptions, convert_onnx
    from converters.from_tflite import convert_tflite

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeward-public-models-") as tmp:
        work = Path(tmp)
        for path in files:
            print(f"converting {path.name} ...", file=sys.stderr, flush=True)
            inputs = _shape_of(path)
            shown = ", ".join("x".join(str(d) for d in shape[1:]) for _, shape in inputs)
            if any(d < 0 for _, shape in inputs for d in shape[1:]):
                rows.append([path.name, shown, "not measured: an input's size is free (give it data)", *[""] * 5])
                continue
            rng = np.random.default_rng(0)
            np.savez(work / "calib.npz", **{name: rng.random((24, *shape[1:])).astype(np.float32)
                                            for name, shape in inputs})
            options = ConvertOptions(name="m", allow_worse=True, format="tflite")
            try:
                convert = convert_onnx if path.suffix == ".onnx" else convert_tflite
                r = convert(path, work / "calib.npz", work / f"{path.stem}.ewb", None, None, options)
            except ConversionError as exc:
                rows.append([path.name, shown, f"refused: {exc.message}", *[""] * 5])
                continue
            lat = r["latency_ms"]
            rows.append([path.name, shown, "converted", f"{r['fp32_bytes'] / 1024:.0f}", f"{r['int8_bytes'] / 1024:.0f}",
                         f"{lat['fp32']['p50']:.3f}", f"{lat['int8']['p50']:.3f}",
                         f"{lat['int8']['p50'] / lat['fp32']['p50']:.2f}x"])
    print(f"{len(files)} models from {', '.join(map(str, folders))}; INT8 TFLite, batch 1, 1 thread, this CPU\n")
    print(format_table(["model", "input", "result", "FP32 kB", "INT8 kB", "FP32 ms", "INT8 ms", "INT8/FP32"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
