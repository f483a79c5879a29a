#!/usr/bin/env python3
"""Recurrent-model benchmark: GRU and LSTM classifiers trained here on the digits (the 8 image
rows as 8 steps), converted by the real converter to full-integer INT8 TFLite (the layers
unrolled, converters/recurrent.py) and, beside it, to ONNX with onnxruntime's dynamic INT8
(its DynamicQuantizeLSTM / GRU kernels), measured side by side in one run: file size, top-1 on
held-out digits, and p50 latency of one sample against the FP32 model in the same runtime.
With --keras, a Keras LSTM (unrolled by TensorFlow for edgeward) as well.

    .venv/bin/python scripts/bench_recurrent.py [--keras]       # about two minutes on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402

FAMILIES = [  # title, kind, hidden, layers, bidirectional
    ("GRU 32", "GRU", 32, 1, False),
    ("GRU 128", "GRU", 128, 1, False),
    ("LSTM 32 ×2 layers", "LSTM", 32, 2, False),
    ("bidirectional LSTM 32", "LSTM", 32, 1, True),
]


def _row(title: str, fmt: str, r: dict) -> list:
    q, lat = r["quality"], r["latency_ms"]
    fp32, int8 = lat["fp32"]["p50"], lat["int8"]["p50"]
    return [title, fmt, f"{r['fp32_bytes'] / 1000:.1f}", f"{r['int8_bytes'] / 1000:.1f}",
            f"{r['int8_bytes'] / r['fp32_bytes']:.2f}×",
            f"{q['accuracy_fp32'] * 100:.2f} % → {q['accuracy_int8'] * 100:.2f} %", f"{q['accuracy_drop_pp']:+.2f}",
            f"{fp32:.3f}", f"{int8:.3f}", f"{int8 / fp32:.2f}×"]


def _keras_lstm(work: Path) -> tuple[Path, Path, Path]:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    x_tr, y_tr, x_te, y_te = zoo.digits_dataset()
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((8, 8), name="rows"), tf.keras.layers.LSTM(32),
                                 tf.keras.layers.Dense(10)])
    model.compile(tf.keras.optimizers.Adam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_tr.reshape(-1, 8, 8), y_tr, epochs=15, batch_size=64, verbose=0)
    model.save(work / "lstm.keras")
    np.savez(work / "rows-calib.npz", rows=x_tr[:200].reshape(-1, 8, 8))
    np.savez(work / "rows-eval.npz", rows=x_te.reshape(-1, 8, 8), labels=y_te)
    return work / "lstm.keras", work / "rows-calib.npz", work / "rows-eval.npz"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keras", action="store_true", help="also a Keras LSTM (needs edgeward[tensorflow])")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-rnn-") as tmp:
        work = Path(tmp)
        calib, evaluation = zoo.write_digits_npz(work)
        for title, kind, hidden, layers, bidirectional in FAMILIES:
            model = work / f"{kind}{hidden}x{layers}{'bi' if bidirectional else ''}.onnx"
            zoo.build_digits_rnn(model, kind, hidden=hidden, layers=layers, bidirectional=bidirectional)
            print(f"converting {title} ...", file=sys.stderr)
            tflite = convert_onnx(model, calib, work / f"{model.stem}-tflite.ewb", None, evaluation,
                                  ConvertOptions(name=model.stem, format="tflite", allow_worse=True))
            dynamic = convert_onnx(model, calib, work / f"{model.stem}-onnx.ewb", None, evaluation,
                                   ConvertOptions(name=model.stem, format="onnx", precision="int8-dynamic",
                                                  allow_worse=True))
            rows += [_row(title, "TFLite INT8 (unrolled)", tflite), _row(title, "ONNX dynamic INT8", dynamic)]
        if args.keras:
            from converters.from_tensorflow import convert_tensorflow

            source, kcalib, keval = _keras_lstm(work)
            print("converting the Keras LSTM ...", file=sys.stderr)
            r = convert_tensorflow(source, kcalib, work / "keras.ewb", None, keval,
                                   ConvertOptions(name="keras_lstm", format="tflite", allow_worse=True))
            rows.append(_row("Keras LSTM 32", "TFLite INT8 (unrolled)", r))
    print(f"\nRecurrent models on the digits (8 steps of 8 pixels), {platform.machine()}, 1 thread, batch 1\n")
    print(format_table(["model", "format", "FP32 kB", "INT8 kB", "size", "top-1 FP32 → INT8", "drop pp",
                        "FP32 p50 ms", "INT8 p50 ms", "INT8/FP32"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
