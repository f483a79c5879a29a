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
import sys
import tempfile
from pathlib import Path

from agent.errors import ConversionError, first_line

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def is_tensorflow_source(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in KERAS_SUFFIXES or (p.is_dir() and (p / "saved_model.pb").exists())


@contextlib.contextmanager
def _native_stderr_held():
    """TensorFlow's C++ side writes to file descriptor 2 itself, past Python's sys.stderr and
    TF_CPP_MIN_LOG_LEVEL: oneDNN notices at import, and the MLIR diagnostics of a conversion that
    fails for a batch of any size before the batch-of-one one succeeds. Those would read as
    errors above a report that says the model converted; they are kept from the terminal here
    (what failed is in the ConversionError, from TensorFlow's Python exception)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _native_stderr_held():
            import tensorflow as tf
    except ImportError as exc:
        raise ConversionError("Keras and SavedModel inputs need TensorFlow, which is not installed",
                              "pip install 'edgeward[tensorflow]' (about 1.4 GB)") from exc
    return tf


def to_float_tflite(path: str | Path, out: str | Path, batch_of_one: bool = False) -> tuple[Path, int]:
    """Write the Keras or SavedModel model as a float .tflite with TensorFlow's converter; with
    `batch_of_one`, for batches of one row, which lets the converter fold the shape arithmetic
    its layers do for a batch of any size, and a Keras model's recurrent layers unrolled. Returns
    (the file, how many recurrent layers were unrolled)."""
    tf = _tf()
    path, unrolled = Path(path), 0
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    try:  # Keras prints its export steps to stdout, which belongs to the report (--json)
        with contextlib.redirect_stdout(io.StringIO()), _native_stderr_held():
            if path.is_dir() and batch_of_one:
                converter = _saved_model_for_batches_of_one(tf, path)
            elif path.is_dir():
                converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
            else:
                model = tf.keras.models.load_model(str(path), compile=False)
                if batch_of_one:
                    model, unrolled = _for_batches_of_one(tf, model)
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
    return out, unrolled


def _for_batches_of_one(tf, model):
    """(the Keras model called on inputs of batch size 1, same names, same weights, its recurrent
    layers unrolled; how many were)."""
    model, unrolled = _unrolled(tf, model)
    inputs = [tf.keras.Input(batch_shape=(1, *i.shape[1:]), dtype=i.dtype, name=i.name) for i in model.inputs]
    return tf.keras.Model(inputs, model(inputs if len(inputs) > 1 else inputs[0]), name=model.name), unrolled


def _unrolled(tf, model):
    """The model with its LSTM, GRU and SimpleRNN layers (Bidirectional ones too) unrolled over
    their steps, same weights: TensorFlow writes a rolled one as a WHILE loop, which edgeward does
    not read, and an unrolled one as plain ops (FULLY_CONNECTED, LOGISTIC, TANH, MUL, ADD, SPLIT,
    UNPACK, PACK) that it quantizes step by step. A layer with a free number of steps cannot be
    unrolled: such a model is left as it is (and its loop refused when it is read)."""
    keras = tf.keras

    def unrolled_config(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Bidirectional):
            for key in ("layer", "backward_layer"):
                if key in config:
                    config[key]["config"]["unroll"] = True
        elif isinstance(layer, keras.layers.RNN) and not config.get("unroll"):
            config["unroll"] = True
        else:
            return None
        return config

    count = sum(1 for layer in model.layers if unrolled_config(layer))
    if not count:
        return model, 0
    try:
        clone = keras.models.clone_model(model, clone_function=lambda layer: layer.__class__.from_config(
            unrolled_config(layer) or layer.get_config()))
        clone.set_weights(model.get_weights())
    except Exception:  # a subclassed model, or steps of unknown number: the model as it is
        return model, 0
    return clone, count


def _saved_model_for_batches_of_one(tf, path: Path):
    """TensorFlow's converter for the SavedModel's serving signature called on inputs of batch
    size 1 (same names; the loaded model's variables become constants)."""
    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    signature = signatures.get("serving_default") or next(iter(signatures.values()), None)
    if signature is None:
        raise ConversionError(f"the SavedModel {path.name} has no signature to convert",
                              "export it with a serving signature (model.export(path) in Keras)")
    fixed = {name: tf.TensorSpec([1, *spec.shape[1:]], spec.dtype, name=name)
             for name, spec in signature.structured_input_signature[1].items()}
    concrete = tf.function(lambda **feeds: signature(**feeds)).get_concrete_function(**fixed)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)


def _float_tflite_edgeward_reads(path: Path, out: Path, say) -> tuple[Path, str | None]:
    """(TensorFlow's float .tflite of the model, None) for a batch of any size where edgeward can
    read that one, else (the one for batches of one, the note that says why): a Keras Dense on a
    sequence ([N, T, D], a transformer's) computes its reshapes from the batch size at run time, a
    Conv1D expands its input's dims, a dilated one moves space to the batch; for a batch of one
    TensorFlow folds them into constants and plain convs. A recurrent layer (a WHILE loop) is
    unrolled then."""
    from .tflite_reader import read_tflite

    try:
        flat, _ = to_float_tflite(path, out)
    except ConversionError:  # an LSTM of Keras 3, for one: its tensor lists need their batch known
        if path.is_dir():
            raise
        why = "TensorFlow converts it for a batch of one only"
    else:
        try:
            read_tflite(flat)
            return flat, None
        except ConversionError as exc:
            why = exc.message
    flat, unrolled = to_float_tflite(path, out, batch_of_one=True)
    read_tflite(flat)  # what still fails says why, in the reader's words
    say("TensorFlow float conversion, for batches of one row", 1, 1)
    note = (f"written for batches of one row, where TensorFlow folds what edgeward cannot read for a batch of any "
            f"size ({why}); the agent runs it a row at a time")
    if unrolled:
        note += (f"; its {unrolled} recurrent layer(s) unrolled over their steps (TensorFlow writes a rolled one as "
                 "a WHILE loop)")
    return flat, note


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
        flat, note = _float_tflite_edgeward_reads(path, Path(tmp) / f"{opts.name}.tflite", progress or (lambda *a: None))
        if progress:
            progress("TensorFlow float conversion", 1, 1)
        report = convert_tflite(flat, calibration, out_path, key_path, evaluation, opts, progress, source_label=label)
    if note:
        report.setdefault("notes", []).append(note)
    return report
