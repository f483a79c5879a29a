"""Keras, SavedModel and float-TFLite sources, each converted end to end to full-integer INT8 TFLite:
a Keras CNN trained here on the digits (Conv + BatchNorm + ReLU, depthwise ReLU6, pooling, Dense,
Softmax), checked op by op, measured against the Keras model itself, and served by the agent."""

import json
import os
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.errors import ConversionError, SelfTestError
from agent.signing import load_public_key
from agent.store import Store
from converters.convert import ConvertOptions
from converters.from_tensorflow import convert_tensorflow
from converters.from_tflite import convert_tflite
from converters.tflite_graph import op_counts

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="module")
def keras_digits(tmp_path_factory):
    """(folder, keras model) with k.keras, a SavedModel folder, a float .tflite and NHWC data files."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("keras")
    d = load_digits()
    x = (d.images / 16).astype(np.float32)[..., None]
    y = d.target
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1), name="pixels"),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.MaxPooling2D(),
        layers.DepthwiseConv2D(3, padding="same", activation="relu6"),
        layers.Conv2D(32, 1, activation="relu"),
        layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dense(10), layers.Softmax()])
    model.compile(tf.keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[:1200], y[:1200], epochs=10, batch_size=32, verbose=0)
    model.save(tmp / "k.keras")
    model.export(tmp / "saved", verbose=False)
    (tmp / "k.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    half = tf.lite.TFLiteConverter.from_keras_model(model)  # float16 weights, as MediaPipe ships its models
    half.optimizations, half.target_spec.supported_types = [tf.lite.Optimize.DEFAULT], [tf.float16]
    (tmp / "k16.tflite").write_bytes(half.convert())
    np.savez(tmp / "calib.npz", pixels=x[:300])
    np.savez(tmp / "eval.npz", pixels=x[1200:], labels=y[1200:])
    return tmp, model


def _check_bundle(report, bundle, keras_model, folder, keys, tmp_path):
    with np.load(folder / "eval.npz") as d:
        x, y = d["pixels"], d["labels"]
    fp32 = keras_model.predict(x, verbose=0)
    assert (fp32.argmax(1) == y).mean() >= 0.9  # a real, trained model
    counts = report["graph"]
    assert counts["ops"]["CONV_2D"] == 2 and counts["ops"]["DEPTHWISE_CONV_2D"] == 1
    assert counts["ops"]["FULLY_CONNECTED"] == 2 and counts["ops"]["SOFTMAX"] == 1
    assert counts["tensor_dtypes"]["float32"] == 2   # float I/O only: every weight and activation is int8
    assert report["quality"]["accuracy_drop_pp"] <= 1.0
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(bundle, [load_public_key(keys[1])])))
    assert model.manifest.inputs[0].name == "pixels" and model.manifest.inputs[0].shape == [-1, 8, 8, 1]
    model.self_test()
    engine.activate(model)
    out = next(iter(engine.infer_arrays(model.name, {"pixels": x})[1].values()))
    assert (out.argmax(1) == fp32.argmax(1)).mean() >= 0.97
    assert np.abs(out - fp32).max() <= 0.1          # probabilities, to a few 1/256 steps
    engine.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from agent.signing import generate_keypair

    key, pub, _ = generate_keypair(tmp_path_factory.mktemp("k") / "signing")
    return key, pub


@pytest.mark.parametrize("source", ["k.keras", "saved"], ids=["keras", "savedmodel"])
def test_keras_and_savedmodel_convert_to_int8_tflite_and_serve(keras_digits, keys, source, tmp_path):
    folder, keras_model = keras_digits
    report = convert_tensorflow(folder / source, folder / "calib.npz", tmp_path / "k.ewb", keys[0],
                                folder / "eval.npz", ConvertOptions(name="kdigits", format="tflite"))
    assert report["source"] == ("keras" if source.endswith(".keras") else "savedmodel")
    _check_bundle(report, tmp_path / "k.ewb", keras_model, folder, keys, tmp_path)


def test_a_keras_model_with_a_fixed_batch_size_is_measured_on_every_sample_and_serves(keras_digits, keys, tmp_path):
    """A model saved with Input(batch_size=4) runs 4 rows at a time: the evaluation (539 digits,
    not a multiple of 4) pads its last run instead of dropping rows, and the board's self-test
    takes the reference that many at a time."""
    import tensorflow as tf

    folder, keras_model = keras_digits
    fixed = tf.keras.Sequential([tf.keras.Input((8, 8, 1), batch_size=4, name="pixels")] + keras_model.layers)
    fixed.save(tmp_path / "fixed.keras")
    report = convert_tensorflow(tmp_path / "fixed.keras", folder / "calib.npz", tmp_path / "f.ewb", keys[0],
                                folder / "eval.npz", ConvertOptions(name="fixed"))
    with np.load(folder / "eval.npz") as d:
        x, n = d["pixels"][:4], len(d["labels"])
    assert n % 4 and report["quality"]["samples"] == n and report["quality"]["accuracy_drop_pp"] <= 1.0
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "f.ewb", [load_public_key(keys[1])])))
    assert model.manifest.inputs[0].shape == [4, 8, 8, 1]
    assert model.self_test()["top1_agreement"] == 1.0
    engine.activate(model)
    out = next(iter(engine.infer_arrays("fixed", {"pixels": x})[1].values()))
    assert (out.argmax(1) == keras_model.predict(x, verbose=0).argmax(1)).all()
    engine.close()


def test_a_keras_transformer_converts_with_its_layer_norms_in_float_and_serves(keys, tmp_path):
    """Keras' Dense on a sequence computes its reshapes from the batch size at run time, which
    edgeward cannot read: the model is written again for batches of one, where they are constants.
    TensorFlow writes LayerNormalization as MEAN, SQUARED_DIFFERENCE, RSQRT, NEG and MULs: those stay
    float, as the ONNX path keeps its LayerNorms; attention and the Dense layers are int8. The same
    model exported as a SavedModel converts alike (its serving signature called for batches of one)."""
    import tensorflow as tf

    from converters import zoo
    from tflitekit import op_dtypes

    accuracy = zoo.build_keras_digits_transformer(tmp_path / "t.keras", epochs=20)
    calib, evaluation = zoo.write_digits_npz(tmp_path)
    steps = []
    report = convert_tensorflow(tmp_path / "t.keras", calib, tmp_path / "t.ewb", keys[0], evaluation,
                                ConvertOptions(name="kt"), progress=lambda label, done, total: steps.append(label))
    assert accuracy >= 0.8 and report["quality"]["accuracy_fp32"] == pytest.approx(accuracy, abs=0.005)
    assert any("batches of one" in label for label in steps)
    assert any(note.startswith("written for batches of one row") for note in report["notes"])
    assert report["quality"]["accuracy_drop_pp"] <= 2.0
    with tarfile.open(tmp_path / "t.ewb") as tar:
        (tmp_path / "t.tflite").write_bytes(tar.extractfile("model.tflite").read())
        manifest = json.load(tar.extractfile("manifest.json"))
    dtypes = op_dtypes(tmp_path / "t.tflite")
    assert dtypes["FULLY_CONNECTED"] == dtypes["BATCH_MATMUL"] == dtypes["SOFTMAX"] == {"int8"}
    assert dtypes["RSQRT"] == dtypes["SQUARED_DIFFERENCE"] == dtypes["NEG"] == {"float32"}
    assert dtypes["MEAN"] == {"float32", "int8"}  # the LayerNorms' means in float, the tokens' mean in int8
    assert "2 LayerNorm layer(s) in float" in manifest["producer"]

    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "t.ewb", [load_public_key(keys[1])])))
    assert model.manifest.inputs[0].shape == [1, 1, 8, 8]
    model.self_test()
    engine.activate(model)
    with np.load(evaluation) as d:
        x = d["input"][:40]
    out = np.concatenate([next(iter(engine.infer_arrays("kt", {"input": row[None]})[1].values())) for row in x])
    keras_out = tf.keras.models.load_model(tmp_path / "t.keras", compile=False).predict(x, verbose=0)
    assert (out.argmax(1) == keras_out.argmax(1)).mean() >= 0.95
    engine.close()

    # the same model exported as a SavedModel: its serving signature is called for batches of one
    tf.keras.models.load_model(tmp_path / "t.keras", compile=False).export(tmp_path / "saved", verbose=False)
    saved = convert_tensorflow(tmp_path / "saved", calib, tmp_path / "s.ewb", keys[0], evaluation,
                               ConvertOptions(name="s"))
    assert saved["source"] == "savedmodel" and any("batches of one row" in n for n in saved["notes"])
    assert saved["quality"]["accuracy_fp32"] == report["quality"]["accuracy_fp32"]
    assert saved["quality"]["accuracy_drop_pp"] <= 2.0


def test_a_keras_upsampler_becomes_int8_ops_that_xnnpack_runs(keys, tmp_path):
    """Keras' Conv2DTranspose is TFLite's TRANSPOSE_CONV, which XNNPACK runs in float only, and its
    hard_swish TFLite's HARD_SWISH, likewise: the INT8 model has neither. Each transposed conv
    becomes the sub-pixel conv it equals (PAD, CONV_2D, DEPTH_TO_SPACE, and a slice where TFLite's
    padding crops: kernel 3 SAME and kernel 4 VALID here; the ReLU after one is fused into its
    conv, through the ops that only move values), hard-swish x * relu6(x + 3) / 6, and the
    whole model is one XNNPACK partition. The float model written from it answers as the file
    does (the converter's read-back check), and the INT8 one close to it."""
    import tensorflow as tf

    from tflitekit import xnnpack_partitions

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    image = tf.keras.Input((16, 16, 3), name="image")
    x = layers.Activation("hard_swish")(layers.Conv2D(16, 3, strides=2, padding="same")(image))
    x = layers.ReLU()(layers.Conv2DTranspose(8, 3, strides=2, padding="same")(x))
    x = layers.Conv2DTranspose(4, 4, strides=2, padding="valid")(x)
    model = tf.keras.Model(image, layers.Conv2D(1, 1)(x))
    model.save(tmp_path / "up.keras")
    x = np.random.default_rng(0).random((48, 16, 16, 3)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=x[:32])
    np.savez(tmp_path / "eval.npz", image=x[32:])
    report = convert_tensorflow(tmp_path / "up.keras", tmp_path / "calib.npz", tmp_path / "up.ewb", keys[0],
                                tmp_path / "eval.npz", ConvertOptions(name="up", allow_worse=True))
    ops = report["graph"]["ops"]
    assert "TRANSPOSE_CONV" not in ops and "HARD_SWISH" not in ops
    assert ops["DEPTH_TO_SPACE"] == 2 and ops["CONV_2D"] == 4 and ops["STRIDED_SLICE"] == 1
    assert ops["MUL"] == 2 and "RELU" not in ops  # hard-swish's; the ReLU went into the sub-pixel conv before it
    assert report["graph"]["tensor_dtypes"]["float32"] == 2  # float I/O: every layer is int8
    q = report["quality"]
    assert q["max_abs_err"] <= 0.05 * q["output_range"], q
    with tarfile.open(tmp_path / "up.ewb") as tar:
        (tmp_path / "up.tflite").write_bytes(tar.extractfile("model.tflite").read())
    assert xnnpack_partitions(tmp_path / "up.tflite") == 1

    engine = Engine(Budget(4096, reserve_mb=0))
    served = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "up.ewb", [load_public_key(keys[1])])))
    served.self_test()
    engine.activate(served)
    out = next(iter(engine.infer_arrays("up", {"image": x[32:33]})[1].values()))
    assert out.shape == (1, 34, 34, 1)  # 8 -> 16 (SAME) -> 34 (VALID, kernel 4)
    assert np.abs(out - model.predict(x[32:33], verbose=0)).max() <= 0.05 * q["output_range"]
    engine.close()


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_a_keras_conv1d_signal_classifier_converts_and_serves(keys, tmp_path, dilation):
    """Sensor and audio models are Conv1D stacks, which TensorFlow writes as EXPAND_DIMS, the conv
    in 2D and a squeeze (RESHAPE) per layer: read as RESHAPEs, the squeeze-then-expand between two
    layers cancels, an AveragePooling1D is an int8 depthwise conv (XNNPACK runs no int8
    AVERAGE_POOL_2D), and the whole model is one XNNPACK part with its batch free. A dilated
    Conv1D TensorFlow writes as SPACE_TO_BATCH_ND, a plain conv and BATCH_TO_SPACE_ND: it is read
    as the conv with that dilation (exact: the converter's read-back check runs both). Trained
    here to tell four tones apart in noise, the INT8 model keeps its accuracy."""
    import tensorflow as tf

    from tflitekit import xnnpack_partitions

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    t = np.arange(128) / 128
    x = np.stack([np.sin(2 * np.pi * (3 + 4 * y)[:, None] * t + c) for c in range(3)], -1)
    x = (x + 0.5 * rng.standard_normal(x.shape)).astype(np.float32)       # [600, 128 steps, 3 axes]
    signal = tf.keras.Input((128, 3), name="signal")
    h = layers.Conv1D(16, 5, padding="same", activation="relu")(signal)
    h = layers.MaxPooling1D(2)(layers.BatchNormalization()(h))
    h = layers.SeparableConv1D(32, 3, padding="same", activation="relu")(h)
    h = layers.Conv1D(32, 3, dilation_rate=dilation, padding="causal", activation="relu")(layers.AveragePooling1D(2)(h))
    model = tf.keras.Model(signal, layers.Dense(4)(layers.GlobalAveragePooling1D()(h)))
    model.compile(tf.keras.optimizers.Adam(3e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:400], y[:400], epochs=8, batch_size=32, verbose=0)
    model.save(tmp_path / "c1d.keras")
    np.savez(tmp_path / "calib.npz", signal=x[:200])
    np.savez(tmp_path / "eval.npz", signal=x[400:], labels=y[400:])
    report = convert_tensorflow(tmp_path / "c1d.keras", tmp_path / "calib.npz", tmp_path / "c1d.ewb", keys[0],
                                tmp_path / "eval.npz", ConvertOptions(name="c1d"))
    q, ops = report["quality"], report["graph"]["ops"]
    assert q["accuracy_fp32"] >= 0.9 and q["accuracy_drop_pp"] <= 2.0, q
    assert ops["CONV_2D"] == 3 and ops["DEPTHWISE_CONV_2D"] == 3 and "AVERAGE_POOL_2D" not in ops, ops  # and BN as 1x1
    assert report["graph"]["tensor_dtypes"]["float32"] == 2
    assert ops["RESHAPE"] == 4 and "MUL" not in ops, ops  # of ten: the first expand, around the causal PAD, the last squeeze
    assert not [n for n in report.get("notes", []) if "batches of one row" in n]
    with tarfile.open(tmp_path / "c1d.ewb") as tar:
        (tmp_path / "c1d.tflite").write_bytes(tar.extractfile("model.tflite").read())
    assert xnnpack_partitions(tmp_path / "c1d.tflite") == 1
    engine = Engine(Budget(4096, reserve_mb=0))
    served = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "c1d.ewb", [load_public_key(keys[1])])))
    assert served.manifest.inputs[0].shape == [-1, 128, 3]
    served.self_test()
    engine.activate(served)
    out = next(iter(engine.infer_arrays("c1d", {"signal": x[400:440]})[1].values()))  # 40 rows at once
    assert (out.argmax(1) == model.predict(x[400:440], verbose=0).argmax(1)).mean() >= 0.95
    engine.close()


def test_dilated_conv1ds_that_pad_and_crop_are_read_as_the_convs_they_are(keys, tmp_path):
    """A 'same' dilated Conv1D over a length its dilation does not divide: TensorFlow pads before
    SPACE_TO_BATCH_ND (4 and 6 steps) and crops after BATCH_TO_SPACE_ND (2). Read as a PAD, the
    dilated conv and a slice, the float model answers as the file does (the converter's read-back
    check would refuse it otherwise) and the batch stays free."""
    import tensorflow as tf

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    signal = tf.keras.Input((30, 3), name="signal")
    h = layers.Conv1D(8, 3, dilation_rate=4, padding="same", activation="relu")(signal)
    h = layers.Conv1D(8, 2, dilation_rate=3, padding="valid")(h)
    model = tf.keras.Model(signal, layers.Dense(4)(layers.Flatten()(h)))
    model.save(tmp_path / "d.keras")
    x = np.random.default_rng(0).standard_normal((80, 30, 3)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", signal=x[:64])
    np.savez(tmp_path / "eval.npz", signal=x[64:])
    report = convert_tensorflow(tmp_path / "d.keras", tmp_path / "calib.npz", tmp_path / "d.ewb", keys[0],
                                tmp_path / "eval.npz", ConvertOptions(name="d", allow_worse=True))
    ops = report["graph"]["ops"]
    assert ops["CONV_2D"] == 2 and ops["PAD"] == 1 and ops["STRIDED_SLICE"] == 1, ops  # the crop, batch free
    assert not report.get("notes") or not any("batches of one" in n for n in report["notes"])
    q = report["quality"]
    assert q["max_abs_err"] <= 0.03 * q["output_range"], q
    engine = Engine(Budget(4096, reserve_mb=0))
    served = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "d.ewb", [load_public_key(keys[1])])))
    assert served.manifest.inputs[0].shape == [-1, 30, 3]
    engine.activate(served)
    out = next(iter(engine.infer_arrays("d", {"signal": x[64:]})[1].values()))
    assert np.abs(out - model.predict(x[64:], verbose=0)).max() <= 0.03 * q["output_range"]
    engine.close()


def _mediapipe_transpose_conv(path, w, b, stride: int, stride_option: int | None = None):
    """A float .tflite of one MediaPipe custom op, Convolution2DTransposeBias (its selfie
    segmenter's last layer): x [1, 4, 4, cin] -> [1, 4 s, 4 s, cout], weights [cout, k, k, cin]."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def tensor(name, shape, buffer):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, s.TensorType.FLOAT32, buffer
        return t

    def buffer(data=None):
        b_ = s.BufferT()
        b_.data = None if data is None else np.frombuffer(data.astype(np.float32).tobytes(), np.uint8)
        return b_

    cout, cin = w.shape[0], w.shape[3]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode, code.version = "Convolution2DTransposeBias", 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    written = stride if stride_option is None else stride_option
    op.customOptions = np.frombuffer(struct.pack("<iii", 1, written, written), np.uint8)  # SAME, stride w, stride h
    sub = s.SubGraphT()
    sub.tensors = [tensor("x", [1, 4, 4, cin], 0), tensor("w", list(w.shape), 1), tensor("b", [cout], 2),
                   tensor("y", [1, 4 * stride, 4 * stride, cout], 0)]
    sub.operators, sub.inputs, sub.outputs = [op], [0], [3]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sub]
    model.buffers = [buffer(), buffer(w), buffer(b)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def test_mediapipes_transposed_conv_custom_op_is_read_as_the_conv_it_is(keys, tmp_path):
    """LiteRT's own kernels lack MediaPipe's Convolution2DTransposeBias, so calibration runs the
    float model edgeward writes from it (a sub-pixel CONV_2D and DEPTH_TO_SPACE), and the INT8
    model computes the transposed conv: each input pixel spreads its kernel over a stride x
    stride block of the output (kernel = stride, as MediaPipe writes it), plus the bias."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 2, 5)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    source = _mediapipe_transpose_conv(tmp_path / "mp.tflite", w, b, stride=2)
    x = rng.standard_normal((40, 4, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:32])
    np.savez(tmp_path / "eval.npz", x=x[32:])
    report = convert_tflite(source, tmp_path / "calib.npz", tmp_path / "mp.ewb", keys[0], tmp_path / "eval.npz",
                            ConvertOptions(name="mp", allow_worse=True))
    assert report["graph"]["ops"]["CONV_2D"] == 1 and report["graph"]["ops"]["DEPTH_TO_SPACE"] == 1
    expected = np.einsum("nijc,okmc->nikjmo", x[32:], w).reshape(8, 8, 8, 3) + b  # [n, i, k, j, m, o]: pixel (2i+k, 2j+m)
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "mp.ewb", [load_public_key(keys[1])])))
    engine.activate(model)
    out = np.concatenate([next(iter(engine.infer_arrays("mp", {"x": row[None]})[1].values())) for row in x[32:]])
    span = float(expected.max() - expected.min())
    assert np.abs(out - expected).max() <= 0.03 * span  # a few int8 steps of the output's range
    engine.close()

    # the options are bytes from the file: a stride of 0 is one clear error, not a division by zero
    bad = _mediapipe_transpose_conv(tmp_path / "bad.tflite", w, b, stride=2, stride_option=0)
    with pytest.raises(ConversionError, match=r"Convolution2DTransposeBias \(op 0\) has strides 0x0"):
        convert_tflite(bad, tmp_path / "calib.npz", tmp_path / "bad.ewb", keys[0], None, ConvertOptions(name="bad"))
    assert not (tmp_path / "bad.ewb").exists()


def _smooth_images(rng, n: int, size: int = 32) -> np.ndarray:
    """NHWC images of 4x4-pixel blocks with a little noise: textures a detector's heads respond to."""
    low = rng.random((n, size // 4, size // 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(low, 4, 1), 4, 2) + 0.05 * rng.standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("int8_io", [False, True], ids=["float-io", "int8-io"])
def test_an_ssd_detector_keeps_its_post_processing_and_its_detections(keys, tmp_path, int8_io):
    """An SSD exported as TensorFlow's detection API does (TFLite_Detection_PostProcess at the end)
    becomes an INT8 backbone and heads with the op kept in float behind them: the bundle answers
    with boxes, classes, scores and a count, as the float file did, also with int8 I/O. Its
    detections are measured, self-tested and served as detections: matched by class and overlap,
    the rows past the count (which the op leaves unwritten) ignored."""
    from agent.detections import agreement
    from ai_edge_litert.interpreter import Interpreter
    from converters.measure import TfliteSession
    from converters.zoo import build_ssd_tflite
    from tflitekit import op_dtypes

    source = build_ssd_tflite(tmp_path / "ssd.tflite", width=64, nms_score_threshold=0.9)  # lists of 0..10
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", image=_smooth_images(rng, 64))
    x = _smooth_images(rng, 48)
    np.savez(tmp_path / "eval.npz", image=x)
    report = convert_tflite(source, tmp_path / "calib.npz", tmp_path / "ssd.ewb", keys[0], tmp_path / "eval.npz",
                            ConvertOptions(name="ssd", tflite_int8_io=int8_io))
    assert report["graph"]["ops"]["TFLite_Detection_PostProcess"] == 1
    with tarfile.open(tmp_path / "ssd.ewb") as tar:
        (tmp_path / "int8.tflite").write_bytes(tar.extractfile("model.tflite").read())
    dtypes = op_dtypes(tmp_path / "int8.tflite")
    assert dtypes["CONV_2D"] == {"int8"} and dtypes["DEPTHWISE_CONV_2D"] == {"int8"}
    assert dtypes["CUSTOM"] == {"float32"} and dtypes["DEQUANTIZE"] == {"float32"}  # its two inputs, dequantized
    q = report["quality"]
    assert q["detections_fp32"] >= 5 * len(x) and q["detection_agreement"] >= 0.9, q
    assert q["matched_iou_mean"] >= 0.95 and q["matched_score_max_err"] <= 0.05, q
    assert report["broken"] is None and report["int8_vs_fp32"] < 0.7

    # the source file's own detections, run in LiteRT, against the agent's (one image a request)
    it = Interpreter(model_path=str(source))
    run = it.get_signature_runner()
    fp32 = [run(image=row[None]) for row in x]
    order = _detection_names(tmp_path / "ssd.ewb")
    bundle = open_bundle(tmp_path / "ssd.ewb", [load_public_key(keys[1])])
    assert sorted(o.name for o in bundle.manifest.outputs) == sorted(order) == sorted(fp32[0])  # the file's names
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(bundle))
    assert model.manifest.inputs[0].dtype == ("int8" if int8_io else "float32")
    assert {o.dtype for o in model.manifest.outputs} == {"float32"}  # detections stay float with int8 I/O
    model.self_test()
    _a_board_that_orders_detections_otherwise_passes_one_that_loses_one_fails(model)
    engine.activate(model)
    feed = model.manifest.inputs[0].name
    grid = TfliteSession(tmp_path / "int8.tflite")  # an int8-I/O model is fed its own input grid's codes
    served = [engine.infer_arrays("ssd", {feed: grid.quantize_inputs({feed: row[None]})[feed]})[1] for row in x]
    stack = lambda runs: {k: np.concatenate([r[k] for r in runs]) for k in order}  # noqa: E731
    served_q = agreement(stack(fp32), stack(served), order)
    assert served_q["detection_agreement"] >= 0.9, served_q
    boxes, classes, scores, count = (stack(served)[n] for n in order)
    assert set(count.astype(int)) & set(range(1, 10))  # lists the op did not fill (threshold 0.9)
    for i, n in enumerate(count.astype(int)):  # past the count: zeros, not an earlier image's detections
        assert scores[i, :n].min() >= 0.9 and not scores[i, n:].any() and not boxes[i, n:].any()
        assert not classes[i, n:].any()
    engine.close()


def test_a_detection_post_process_whose_options_are_damaged_is_one_clear_error(keys, tmp_path):
    """Its options are bytes from the file (a flexbuffer): unreadable ones are refused while
    reading, before LiteRT runs anything, and no bundle is written."""
    from ai_edge_litert import schema_py_generated as s

    from converters.tflite_reader import read_tflite
    from converters.zoo import build_ssd_tflite

    source = build_ssd_tflite(tmp_path / "ssd.tflite")
    graph, _ = read_tflite(source)
    post = [op for op in graph.ops if op.kind == "DETECTION_POSTPROCESS"]
    assert len(post) == 1 and post[0].options["score_threshold"] == pytest.approx(0.3)
    assert graph.detections() == post[0].outputs and set(graph.detections()) == set(graph.outputs)
    model = s.ModelT.InitFromPackedBuf(source.read_bytes(), 0)
    op = next(o for o in model.subgraphs[0].operators if o.customOptions is not None)
    op.customOptions = np.frombuffer(b"\xff" * 12, np.uint8)
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    (tmp_path / "bad.tflite").write_bytes(bytes(builder.Output()))
    np.savez(tmp_path / "calib.npz", image=np.zeros((32, 32, 32, 3), np.float32))
    with pytest.raises(ConversionError, match=r"custom op TFLite_Detection_PostProcess \(op \d+\) has options "
                                              r"edgeward cannot read"):
        convert_tflite(tmp_path / "bad.tflite", tmp_path / "calib.npz", tmp_path / "bad.ewb", keys[0], None,
                       ConvertOptions(name="bad"))
    assert not (tmp_path / "bad.ewb").exists()


def _a_board_that_orders_detections_otherwise_passes_one_that_loses_one_fails(model):
    """The self-test on reference data as another runtime might have answered: the same detections
    in reverse order (ties sorted otherwise) pass; the best detection of an image moved away fails."""
    from agent.bundle import REFERENCE

    path = model.folder / REFERENCE
    with np.load(path) as ref:
        data = {k: ref[k] for k in ref.files}
    boxes, classes, scores, count = (f"expected.{n}" for n in data["detections"])
    n = int(data[count][0])
    assert n >= 2
    for key in (boxes, classes, scores):
        data[key][0, :n] = data[key][0, :n][::-1].copy()
    np.savez(path, **data)
    model.self_test()  # compared element by element, the reversed rows would differ by whole classes
    data[boxes][0, 0] += 2.0  # the worst and (last, now) the best detection of image 0 elsewhere
    data[boxes][0, n - 1] += 2.0
    np.savez(path, **data)
    with pytest.raises(SelfTestError, match=r"image 0: a class \d detection \(score .*\) is (missing|extra)"):
        model.self_test()


def _detection_names(bundle) -> list[str]:
    """The detector's outputs in the op's order, as the bundle's reference data names them."""
    with tarfile.open(bundle) as tar, np.load(tar.extractfile("reference.npz")) as ref:
        return [str(n) for n in ref["detections"]]


def test_a_float_tflite_is_quantized_and_serves(keras_digits, keys, tmp_path):
    folder, keras_model = keras_digits
    report = convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "t.ewb", keys[0],
                            folder / "eval.npz", ConvertOptions(name="tdigits", method="percentile"))
    assert report["source"] == "tflite" and report["format"] == "tflite"
    _check_bundle(report, tmp_path / "t.ewb", keras_model, folder, keys, tmp_path)


def test_the_accuracy_search_on_a_float_tflite_tries_only_what_it_can_calibrate(keras_digits, keys, tmp_path,
                                                                                  monkeypatch):
    from converters import guard

    real = guard.quality_drop  # every setting misses the budget until a layer is kept in float
    drops = []
    monkeypatch.setattr(guard, "quality_drop", lambda q: drops.append(real(q)) or (0.5 if len(drops) < 5 else 0.0))
    folder, _ = keras_digits
    report = convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "s.ewb", keys[0],
                            folder / "eval.npz", ConvertOptions(name="tdigits", max_drop=0.01))
    tried = [(a["settings"], a["note"]) for a in report["search"]["attempts"]]
    assert [t for t, _ in tried[:4]] == ["minmax, per-channel", "percentile, per-channel",
                                         "minmax, per-tensor", "percentile, per-tensor"]
    assert "float: " in tried[4][0] and len(tried) == 5 and not any(note for _, note in tried)


def test_a_tflite_with_float16_weights_is_quantized_and_serves(keras_digits, keys, tmp_path):
    """TFLite's float16 form (weights stored as float16, each through a DEQUANTIZE): the weights are
    read as float32 constants and the DEQUANTIZEs drop out."""
    folder, keras_model = keras_digits
    counts = op_counts(folder / "k16.tflite")
    assert counts["tensor_dtypes"]["float16"] >= 6 and counts["ops"]["DEQUANTIZE"] >= 6
    report = convert_tflite(folder / "k16.tflite", folder / "calib.npz", tmp_path / "h.ewb", keys[0],
                            folder / "eval.npz", ConvertOptions(name="hdigits"))
    assert report["graph"]["ops"]["DEQUANTIZE"] == 1 and "float16" not in report["graph"]["tensor_dtypes"]  # its output's
    _check_bundle(report, tmp_path / "h.ewb", keras_model, folder, keys, tmp_path)


def test_a_tflite_with_sparse_weights_reads_back_as_it_computes(keras_digits, keys, tmp_path):
    """Weights TFLite stores sparse (TensorFlow's EXPERIMENTAL_SPARSITY on a pruned model, float16 here
    too: MediaPipe's pose and face detectors) are read dense: the float model written back answers
    exactly as the file does, and it quantizes with no DENSIFY left."""
    import tensorflow as tf

    from converters.measure import TfliteSession
    from converters.tflite_graph import write_tflite
    from converters.tflite_reader import read_tflite

    folder, keras_model = keras_digits
    pruned = tf.keras.models.clone_model(keras_model)
    pruned.set_weights([np.where(np.abs(w) < np.median(np.abs(w)), 0, w) if w.ndim > 1 else w
                        for w in keras_model.get_weights()])
    conv = tf.lite.TFLiteConverter.from_keras_model(pruned)
    conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY, tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    (tmp_path / "sparse.tflite").write_bytes(conv.convert())
    assert op_counts(tmp_path / "sparse.tflite")["ops"]["DENSIFY"] >= 2
    graph, _ = read_tflite(tmp_path / "sparse.tflite")
    write_tflite(graph, tmp_path / "dense.tflite")
    with np.load(folder / "eval.npz") as d:
        x = d["pixels"][:64]
    source, dense = TfliteSession(tmp_path / "sparse.tflite"), TfliteSession(tmp_path / "dense.tflite")
    want = source.run(None, {source.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(dense.run(None, {"pixels": x})[0], want, rtol=0, atol=1e-6)
    report = convert_tflite(tmp_path / "sparse.tflite", folder / "calib.npz", tmp_path / "s.ewb", keys[0],
                            folder / "eval.npz", ConvertOptions(name="sdigits"))
    assert "DENSIFY" not in report["graph"]["ops"] and report["quality"]["top1_agreement"] >= 0.97


@pytest.mark.parametrize("step", [1, 2])
def test_a_strided_slice_with_steps_of_one_reads_as_a_slice_and_others_are_refused(tmp_path, step):
    """TensorFlow writes x[:, 1:7, :, :4] as STRIDED_SLICE (masks for the whole axes): with steps of 1
    it is a SLICE, computed as the file does; with other steps it is refused by name."""
    import tensorflow as tf

    from converters.measure import TfliteSession
    from converters.tflite_graph import write_tflite
    from converters.tflite_reader import read_tflite

    tf.keras.utils.set_random_seed(1)
    layers = tf.keras.layers
    inp = tf.keras.Input((8, 8, 3), name="pixels")
    x = layers.Conv2D(8, 3, padding="same")(inp)
    x = layers.Lambda(lambda t: t[:, 1:7:step, :, :4])(x)
    model = tf.keras.Model(inp, layers.Dense(5)(layers.Flatten()(x)))
    (tmp_path / "s.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    assert op_counts(tmp_path / "s.tflite")["ops"]["STRIDED_SLICE"] >= 1
    if step != 1:
        with pytest.raises(ConversionError, match=r"STRIDED_SLICE \(op \d+\) is not a plain slice"):
            read_tflite(tmp_path / "s.tflite")
        return
    graph, _ = read_tflite(tmp_path / "s.tflite")
    assert "SLICE" in [op.kind for op in graph.ops]
    write_tflite(graph, tmp_path / "again.tflite")
    x = np.random.default_rng(2).random((4, 8, 8, 3)).astype(np.float32)
    source = TfliteSession(tmp_path / "s.tflite")
    want = source.run(None, {source.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(TfliteSession(tmp_path / "again.tflite").run(None, {"pixels": x})[0], want,
                               rtol=0, atol=1e-5)


def test_the_cli_takes_a_keras_file_and_prints_only_the_report_with_json(keras_digits, keys, tmp_path):
    folder, _ = keras_digits
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(folder / "k.keras"), "--calibration",
                           str(folder / "calib.npz"), "--eval", str(folder / "eval.npz"), "--key", str(keys[0]),
                           "--tflite-io", "int8", "-o", str(tmp_path / "k.ewb"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the report on stdout, though TensorFlow is chatty
    assert report["format"] == "tflite" and "float32" not in report["graph"]["tensor_dtypes"]


def test_an_already_quantized_tflite_is_refused_with_the_fix(keras_digits, keys, tmp_path):
    folder, _ = keras_digits
    convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "q.ewb", keys[0])
    with tarfile.open(tmp_path / "q.ewb") as tar:
        (tmp_path / "int8.tflite").write_bytes(tar.extractfile("model.tflite").read())
    assert op_counts(tmp_path / "int8.tflite")["tensor_dtypes"]["int8"] > 0
    with pytest.raises(ConversionError, match="already quantized.*give the float"):
        convert_tflite(tmp_path / "int8.tflite", folder / "calib.npz", tmp_path / "again.ewb")
    assert not (tmp_path / "again.ewb").exists()


@pytest.mark.parametrize("content,match", [(b"not a model at all", "not a TFLite model"),
                                           (b"\x00" * 4 + b"TFL3" + b"\xff" * 40, "not a readable TFLite")])
def test_a_file_that_is_not_a_tflite_model_is_one_clear_error(tmp_path, content, match):
    (tmp_path / "bad.tflite").write_bytes(content)
    np.savez(tmp_path / "c.npz", x=np.zeros((16, 4), np.float32))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(tmp_path / "bad.tflite"),
                           "--calibration", str(tmp_path / "c.npz"), "-o", str(tmp_path / "b.ewb")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert match in proc.stderr and not (tmp_path / "b.ewb").exists()


def test_calibration_data_in_the_wrong_layout_names_the_shape(keras_digits, tmp_path):
    folder, _ = keras_digits
    np.savez(tmp_path / "nchw.npz", pixels=np.zeros((32, 1, 8, 8), np.float32))
    with pytest.raises(ConversionError, match=r"shape \[32, 1, 8, 8\], the model takes Nx8x8x1"):
        convert_tflite(folder / "k.tflite", tmp_path / "nchw.npz", tmp_path / "x.ewb")


def test_a_tflite_source_cannot_become_onnx(keras_digits, tmp_path):
    folder, _ = keras_digits
    with pytest.raises(ConversionError, match="TFLite only"):
        convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "x.ewb",
                       options=ConvertOptions(format="both"))


def test_damaged_tflite_files_are_one_clear_error_never_a_traceback(keras_digits, tmp_path):
    """Bytes flipped all over a real model: every outcome is a ConversionError (or, where the
    damage is harmless, a model that reads), never another exception."""
    from converters.tflite_reader import read_tflite

    folder, _ = keras_digits
    good = (folder / "k.tflite").read_bytes()
    rng = np.random.default_rng(0)
    for i in range(60):
        bad = bytearray(good)
        for pos in rng.integers(8, len(bad), size=8):
            bad[pos] = int(rng.integers(0, 256))
        (tmp_path / "bad.tflite").write_bytes(bytes(bad))
        try:
            read_tflite(tmp_path / "bad.tflite")
        except ConversionError:
            pass


def test_a_float_tflite_can_be_pruned_and_is_measured_against_the_unpruned_model(keras_digits, keys, tmp_path):
    folder, _ = keras_digits
    plain = convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "a.ewb", keys[0],
                           folder / "eval.npz", ConvertOptions(name="a"))
    sparse = convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "b.ewb", keys[0],
                            folder / "eval.npz", ConvertOptions(name="b", prune=0.5))
    assert sparse["pruning"]["sparsity"] >= 0.49
    assert sparse["fp32_bytes"] == plain["fp32_bytes"]              # the same unpruned FP32 baseline
    assert sparse["quality"]["accuracy_fp32"] == plain["quality"]["accuracy_fp32"]
    assert sparse["bundle_bytes"] < plain["bundle_bytes"]           # zeros pay in the xz bundle
    with tarfile.open(tmp_path / "b.ewb") as tar:
        (tmp_path / "b.tflite").write_bytes(tar.extractfile("model.tflite").read())
    from converters.measure import TfliteSession

    with np.load(folder / "eval.npz") as d:
        x = d["pixels"][:64]
    out = TfliteSession(tmp_path / "b.tflite").run(None, {"pixels": x})[0]
    assert out.shape == (64, 10) and np.isfinite(out).all()
    with pytest.raises(ConversionError, match="--prune-channels works on ONNX and PyTorch"):
        convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "c.ewb",
                       options=ConvertOptions(prune_channels=0.5))


@pytest.mark.parametrize("build", ["text_detector", "strip_upsampler"])
def test_a_float_tflite_with_resizes_and_upsampling_reads_back_as_it_computes(tmp_path, build):
    """A float .tflite holding RESIZE_*, DEPTH_TO_SPACE, SLICE, PAD (a text detector) or
    TRANSPOSE_CONV, PRELU and LEAKY_RELU (written here by edgeward from ONNX) is read with
    every op's options and TFLite's input order: written again, it computes what it did, and
    its INT8 form stays close."""
    import onnx

    from converters import zoo
    from converters.measure import TfliteSession, run_all
    from converters.onnx_to_tflite import calibration_ranges as onnx_ranges
    from converters.onnx_to_tflite import lower
    from converters.tflite_graph import write_tflite
    from converters.tflite_reader import calibration_ranges, read_tflite

    model = getattr(zoo, f"build_{build}" if build == "strip_upsampler" else "build_text_detector_like")(
        tmp_path / "m.onnx", size=32)
    write_tflite(lower(onnx.load(str(model))), tmp_path / "float.tflite")
    graph, names = read_tflite(tmp_path / "float.tflite")
    kinds = {op.kind for op in graph.ops}
    assert ({"RESIZE_BILINEAR", "DEPTH_TO_SPACE"} if build == "text_detector" else {"TRANSPOSE_CONV", "PRELU",
                                                                                    "LEAKY_RELU"}) <= kinds
    write_tflite(graph, tmp_path / "again.tflite")
    x = np.random.default_rng(7).standard_normal((6, 3, 32, 32)).astype(np.float32)

    def out(path):
        session = TfliteSession(path)
        return run_all(session, {"image": x})[session.get_outputs()[0].name]

    want = out(tmp_path / "float.tflite")
    np.testing.assert_allclose(out(tmp_path / "again.tflite"), want, rtol=0, atol=1e-6)
    ranges = calibration_ranges(tmp_path / "float.tflite", graph, names, {"image": x})
    write_tflite(graph, tmp_path / "int8.tflite", ranges)
    assert op_counts(tmp_path / "int8.tflite")["tensor_dtypes"]["float32"] == 2
    span = want.max() - want.min()
    got = out(tmp_path / "int8.tflite")
    assert np.abs(got - want).max() <= 0.1 * span
    # the same INT8 model as the ONNX path writes from the same data: the reader lost nothing
    onnx_graph = lower(onnx.load(str(model)))
    write_tflite(onnx_graph, tmp_path / "from-onnx.tflite", onnx_ranges(model, onnx_graph, {"image": x}))
    assert np.abs(got - out(tmp_path / "from-onnx.tflite")).max() <= 0.02 * span


def test_a_float_model_that_reads_back_differently_from_its_file_is_refused(keras_digits, monkeypatch, tmp_path):
    """Every INT8 number of a TFLite source is measured against the float model edgeward writes from
    what it read; so that a misread layer cannot hide there, that model must answer as the file
    does. A reader that got one weight wrong is caught, and nothing is written."""
    import converters.from_tflite as from_tflite

    folder, _ = keras_digits
    real = from_tflite.read_tflite

    def misread(path, cut_at=None):
        graph, names = real(path, cut_at)
        weights = next(op.inputs[1] for op in graph.ops if op.kind == "FULLY_CONNECTED")
        graph.consts[weights] = graph.consts[weights] * 1.5
        return graph, names

    monkeypatch.setattr(from_tflite, "read_tflite", misread)
    with pytest.raises(ConversionError, match="reading of k.tflite computes something else than the file: output"):
        convert_tflite(folder / "k.tflite", folder / "calib.npz", tmp_path / "m.ewb", None, folder / "eval.npz")
    assert not list(tmp_path.iterdir())
