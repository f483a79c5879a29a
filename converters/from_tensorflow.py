"""Keras (.keras / .h5) and TensorFlow SavedModel in: TensorFlow's own TFLite converter makes the
float .tflite (the one step that needs TensorFlow), edgeward quantizes it (`from_tflite`).

Why not TensorFlow's INT8 quantizer: going through edgeward's writer gives every source the
same calibration methods, the same accuracy search (layers kept in float) and the same checks.
TensorFlow is the `tensorflow` extra (~1.4 GB); it is imported only here, never on a board.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from agent.errors import ConversionError, first_line

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def is_tensorflow_source(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in KERAS_SUFFIXES or (p.is_dir() and (p / "saved_model.pb").exists())


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ConversionError("Keras and SavedModel inputs need TensorFlow, which is not installed",
                              "pip install 'edgeward[tensorflow]' (about 1.4 GB)") from exc
    return tf


def to_float_tflite(path: str | Path, out: str | Path) -> Path:
    """Write the Keras or SavedModel model as a float .tflite with TensorFlow's converter."""
    tf = _tf()
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    try:  # Keras prints its export steps to stdout, which belongs to the report (--json)
        with contextlib.redirect_stdout(io.StringIO()):
            if path.is_dir():
                converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
            else:
                model = tf.keras.models.load_model(str(path), compile=False)
                converter = tf.lite.TFLiteConverter.from_keras_model(model)
            flat = converter.convert()
    except ConversionError:
        raise
    except Exception as exc:
        kind = "SavedModel" if path.is_dir() else "Keras model"
        raise ConversionError(f"TensorFlow could not convert the {kind} {path.name}: {first_line(exc)}",
                              "check that it loads with tf.keras.models.load_model / tf.saved_model.load") from exc
    out = Path(out)
    out.write_bytes(flat)
    return out


def convert_tensorflow(path: str | Path, calibration, out_path, key_path=None, evaluation=None, options=None,
                       progress=None) -> dict:
    from .convert import ConvertOptions
    from .from_tflite import convert_tflite

    opts = options or ConvertOptions(format="tflite")
    path = Path(path)
    opts.name = opts.name or path.stem
    label = "savedmodel" if path.is_dir() else "keras"
    with tempfile.TemporaryDirectory(prefix="edgeward-tf-") as tmp:
        if progress:
            progress("TensorFlow float conversion", 0, 1)
        flat = to_float_tflite(path, Path(tmp) / f"{opts.name}.tflite")
        if progress:
            progress("TensorFlow float conversion", 1, 1)
        return convert_tflite(flat, calibration, out_path, key_path, evaluation, opts, progress, source_label=label)
