"""Converted TFLite bundles for the runtime tests, made once by the main environment.

The oldest-board environment (scripts/test-oldest-board.sh, tflite-runtime 2.14) has neither onnx nor
LiteRT's schema, so the bundles it must run are converted here and handed over in a folder,
with the inputs and the outputs ai-edge-litert gave for them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CASES = {  # bundle stem -> (source model, input name, int8 I/O)
    "digits-int8": ("digits", "input", False),
    "digits-int8io": ("digits", "input", True),
    "mobilenet-int8": ("mobilenet", "image", False),
    "keras-int8": ("keras", "pixels", False),    # through TensorFlow's float converter: MEAN, SOFTMAX too
    "fire-int8": ("fire", "image", False),        # concatenated branches, requantized to one scale
    "mv3-int8": ("mv3", "image", False),          # hard-swish and squeeze-excite: broadcast MUL, constants
    "det-int8": ("det", "image", False),          # a text detector: RESIZE_*, DEPTH_TO_SPACE, PAD, SLICE
    "strip-int8": ("strip", "image", False),      # PRELU, LEAKY_RELU, TRANSPOSE_CONV (batches of one)
    "c2f-int8": ("c2f", "image", False),          # YOLOv8's parts: SiLU, Split and Slice as SLICE, SAME max pools
    "yolo-int8": ("yolo", "input", False),        # YOLOv8's decoding: TRANSPOSE, RESHAPE, SOFTMAX, a float output concat
    "transformer-int8": ("transformer", "input", False),  # attention (BATCH_MATMUL), GELU, LayerNorm in float
    "keras-transformer-int8": ("ktransformer", "input", False),  # TensorFlow's LayerNorm: NEG, SQUARED_DIFFERENCE
    "ssd-int8": ("ssd", "image", False),          # a float .tflite SSD: TFLite_Detection_PostProcess kept in float
    "yolo-nms-int8": ("yolo", "input", False),    # --nms: the decoding, LOG, then TFLite_Detection_PostProcess
    "gru-int8": ("gru", "input", False),          # a PyTorch GRU unrolled: steps of FULLY_CONNECTED, LOGISTIC, TANH
}
DETECTORS = {"ssd-int8", "yolo-nms-int8"}  # answers compared as detections (agent/detections.py), one image a request


def op_dtypes(path: str | Path) -> dict[str, set[str]]:
    """Each op kind in a .tflite file -> the dtypes of the tensors its ops put out."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    sub = model.subgraphs[0]
    kinds = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    found: dict[str, set[str]] = {}
    for op in sub.operators:
        kind = kinds[model.operatorCodes[op.opcodeIndex].builtinCode]
        found.setdefault(kind, set()).add(types[sub.tensors[op.outputs[0]].type])
    return found


def xnnpack_partitions(path: str | Path) -> int:
    """How many parts of the model XNNPACK takes, as LiteRT plans it: each op XNNPACK cannot run
    in the middle of a model splits it into one more."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    return sum(o["op_name"] == "DELEGATE" for o in it._get_ops_details())  # the model's ops, then the delegate's


def _keras_model(folder: Path):
    """A small Keras CNN (NHWC) trained briefly on the digits, saved as .keras, with its data files."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16).astype(np.float32)[..., None], d.target
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1), name="pixels"), layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(),
        layers.ReLU(), layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu6"),
        layers.Conv2D(16, 1, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(10), layers.Softmax()])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:1200], y[:1200], epochs=3, verbose=0)
    model.save(folder / "keras.keras")
    np.savez(folder / "keras-calib.npz", pixels=x[:200])
    np.savez(folder / "keras-eval.npz", pixels=x[1200:], labels=y[1200:])
    return folder / "keras-calib.npz", folder / "keras-eval.npz"


def _decoded_yolo(folder: Path):
    """tests/yolokit.py's YOLOv8 head and decoding exported to ONNX, with its data files."""
    sys.path.insert(0, str(Path(__file__).parent))
    from yolokit import decoded_yolo

    from converters.from_torch import to_onnx

    x = np.random.default_rng(0).random((64, 3, 32, 32)).astype(np.float32)
    to_onnx(decoded_yolo(), {"input": x[:2]}, folder / "yolo.onnx")
    np.savez(folder / "yolo-calib.npz", input=x[:48])
    np.savez(folder / "yolo-eval.npz", input=x[48:])
    return folder / "yolo-calib.npz", folder / "yolo-eval.npz"


def _ssd(folder: Path):
    """converters.zoo's SSD-style float .tflite detector, with images of coloured blocks to detect."""
    from converters.zoo import build_ssd_tflite

    build_ssd_tflite(folder / "ssd.tflite", width=64, nms_score_threshold=0.9)
    rng = np.random.default_rng(4)
    low = rng.random((96, 8, 8, 3)).astype(np.float32)
    x = np.repeat(np.repeat(low, 4, 1), 4, 2)
    np.savez(folder / "ssd-calib.npz", image=x[:64])
    np.savez(folder / "ssd-eval.npz", image=x[64:])
    return folder / "ssd-calib.npz", folder / "ssd-eval.npz"


def build(folder: str | Path) -> Path:
    from agent.signing import generate_keypair
    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx
    from converters.measure import TfliteSession

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, _, _ = generate_keypair(folder / "signing")
    zoo.build_digits_cnn(folder / "digits.onnx", epochs=6)
    zoo.build_mobilenet_like(folder / "mobilenet.onnx", size=32)
    zoo.build_fire_cnn(folder / "fire.onnx", size=32)
    zoo.build_mobilenet_v3_like(folder / "mv3.onnx", size=32)
    zoo.build_text_detector_like(folder / "det.onnx", size=32, last_kernel=4)
    zoo.build_strip_upsampler(folder / "strip.onnx", size=32)
    zoo.build_c2f_cnn(folder / "c2f.onnx", size=32)
    zoo.build_digits_transformer(folder / "transformer.onnx", epochs=8)
    zoo.build_keras_digits_transformer(folder / "ktransformer.keras", epochs=8)
    zoo.build_digits_rnn(folder / "gru.onnx", "GRU", epochs=6)
    data = {"digits": zoo.write_digits_npz(folder), "mobilenet": zoo.write_image_npz(folder, size=32),
            "keras": _keras_model(folder), "fire": zoo.write_image_npz(folder / "fire", size=32),
            "mv3": zoo.write_image_npz(folder / "mv3", size=32), "det": zoo.write_image_npz(folder / "det", size=32),
            "strip": zoo.write_image_npz(folder / "strip", size=32),
            "c2f": zoo.write_image_npz(folder / "c2f", size=32), "yolo": _decoded_yolo(folder),
            "transformer": zoo.write_digits_npz(folder / "transformer"),
            "ktransformer": zoo.write_digits_npz(folder / "ktransformer"), "ssd": _ssd(folder),
            "gru": zoo.write_digits_npz(folder / "gru")}
    expected = {}
    for stem, (model, name, int8_io) in CASES.items():
        calib, evaluation = data[model]
        bundle = folder / f"{stem}.ewb"
        options = ConvertOptions(name=stem, format="tflite", tflite_int8_io=int8_io, allow_worse=True,
                                 nms="yolo,score=0.5,max=20" if "nms" in stem else None)
        if model in ("keras", "ktransformer"):
            from converters.from_tensorflow import convert_tensorflow

            convert_tensorflow(folder / f"{model}.keras", calib, bundle, key, evaluation, options)
        elif model == "ssd":
            from converters.from_tflite import convert_tflite

            convert_tflite(folder / "ssd.tflite", calib, bundle, key, evaluation, options)
        else:
            convert_onnx(folder / f"{model}.onnx", calib, bundle, key, evaluation, options)
        import tarfile

        with tarfile.open(bundle) as tar:
            (folder / f"{stem}.tflite").write_bytes(tar.extractfile("model.tflite").read())
        session = TfliteSession(folder / f"{stem}.tflite")
        with np.load(evaluation) as d:
            x = session.quantize_inputs({name: d[name][:16]})
        expected[f"{stem}.input"] = x[name]
        if stem in DETECTORS:  # every output, an image at a time (the op takes batches of one)
            runs = [session.raw_run({name: row[None]}) for row in x[name]]
            for out_name in runs[0]:
                expected[f"{stem}.out.{out_name}"] = np.concatenate([r[out_name] for r in runs])
            with tarfile.open(bundle) as tar, np.load(tar.extractfile("reference.npz")) as ref:
                expected[f"{stem}.detections"] = ref["detections"]
            continue
        out_name, out = next(iter(session.raw_run(x).items()))
        expected[f"{stem}.output"] = out
        # one quantization step of the output: the int8 tensor the float output is dequantized from, or,
        # for an output joined in float from parts of different scales, one int8 step of its range
        details = {d["name"]: d for d in session.rt.tensor_details()}
        step = (details.get(f"{out_name}/int8") or details[out_name])["quantization"][0]
        expected[f"{stem}.step"] = np.float64(step or (out.max() - out.min()) / 255)
    np.savez(folder / "converted.npz", **expected)
    return folder


if __name__ == "__main__":
    build(sys.argv[1])
