"""Small real models built in code, for the demo, the tests and the benchmarks.

Nothing is downloaded: the data is scikit-learn's bundled 8x8 digits, and the
CNN is trained here with plain numpy (a few seconds on one core), then written
as an ordinary FP32 ONNX file, exactly what a user's exporter would hand us.

Architecture: Conv3x3(1->C, pad 1) -> ReLU -> MaxPool2 -> Flatten -> Gemm(C*16->H) -> ReLU -> Gemm(H->10)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MLP_INPUT = "features"


def digits_dataset(test_fraction: float = 0.3, seed: int = 0):
    """(x_train, y_train, x_test, y_test); x is float32 NCHW in [0, 1], y is int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _im2col(x: np.ndarray) -> np.ndarray:
    """(B,1,8,8) -> (B*64, 9): each row the 3x3 neighbourhood (zero-padded) of one pixel."""
    b = x.shape[0]
    p = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    cols = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))  # (B,8,8,3,3)
    return cols.reshape(b * 64, 9)


def _forward(params: dict, x: np.ndarray):
    b = x.shape[0]
    c = params["conv_w"].shape[0]
    cols = _im2col(x)
    conv = cols @ params["conv_w"].reshape(c, 9).T + params["conv_b"]          # (B*64, C)
    conv = conv.reshape(b, 8, 8, c).transpose(0, 3, 1, 2)                       # (B,C,8,8)
    act = np.maximum(conv, 0)
    r = act.reshape(b, c, 4, 2, 4, 2)
    pooled = r.max(axis=(3, 5))                                                 # (B,C,4,4)
    flat = pooled.reshape(b, -1)
    hid_pre = flat @ params["fc1_w"] + params["fc1_b"]
    hid = np.maximum(hid_pre, 0)
    logits = hid @ params["fc2_w"] + params["fc2_b"]
    return logits, (cols, conv, r, pooled, flat, hid_pre, hid)


def predict(params: dict, x: np.ndarray) -> np.ndarray:
    return _forward(params, x)[0]


def train_digits_cnn(epochs: int = 12, seed: int = 0, channels: int = 8, hidden: int = 32,
                     lr: float = 0.01, batch: int = 32):
    """Train with Adam on the digits training split; return (params, test accuracy)."""
    x_tr, y_tr, x_te, y_te = digits_dataset()
    rng = np.random.default_rng(seed)
    c, h = channels, hidden
    params = {
        "conv_w": (rng.standard_normal((c, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32),
        "conv_b": np.zeros(c, np.float32),
        "fc1_w": (rng.standard_normal((c * 16, h)) * np.sqrt(2 / (c * 16))).astype(np.float32),
        "fc1_b": np.zeros(h, np.float32),
        "fc2_w": (rng.standard_normal((h, 10)) * np.sqrt(1 / h)).astype(np.float32),
        "fc2_b": np.zeros(10, np.float32),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb, yb = x_tr[idx], y_tr[idx]
            n = len(idx)
            logits, (cols, conv, r, pooled, flat, hid_pre, hid) = _forward(params, xb)
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            d_logits = prob
            d_logits[np.arange(n), yb] -= 1
            d_logits /= n
            grads = {"fc2_w": hid.T @ d_logits, "fc2_b": d_logits.sum(0)}
            d_hid = (d_logits @ params["fc2_w"].T) * (hid_pre > 0)
            grads["fc1_w"], grads["fc1_b"] = flat.T @ d_hid, d_hid.sum(0)
            d_pooled = (d_hid @ params["fc1_w"].T).reshape(pooled.shape)
            mask = r == pooled[:, :, :, None, :, None]
            mask = mask / mask.sum(axis=(3, 5), keepdims=True)
            d_act = (mask * d_pooled[:, :, :, None, :, None]).reshape(conv.shape)
            d_conv = (d_act * (conv > 0)).transpose(0, 2, 3, 1).reshape(-1, c)  # (B*64, C)
            grads["conv_w"] = (d_conv.T @ cols).reshape(c, 1, 3, 3)
            grads["conv_b"] = d_conv.sum(0)
            step += 1
            for k in params:
                g = grads[k].astype(np.float32)
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                m_hat = m[k] / (1 - 0.9 ** step)
                v_hat = v[k] / (1 - 0.999 ** step)
                params[k] -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)
    accuracy = float((predict(params, x_te).argmax(1) == y_te).mean())
    return params, accuracy


def cnn_to_onnx(params: dict, path: str | Path, opset: int = 17) -> Path:
    """Write the trained CNN as an FP32 ONNX model with a dynamic batch axis."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in
             ("conv_w", "conv_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["conv_relu"]),
        helper.make_node("MaxPool", ["conv_relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc1_w", "fc1_b"], ["fc1"]),
        helper.make_node("Relu", ["fc1"], ["fc1_relu"]),
        helper.make_node("Gemm", ["fc1_relu", "fc2_w", "fc2_b"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return _save(graph, path, opset)


def _save(graph, path: str | Path, opset: int = 17) -> Path:
    """Wrap a graph in a checked FP32 ONNX model file, as an exporter would write it."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeward.zoo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_digits_cnn(path: str | Path, epochs: int = 12, seed: int = 0, **kw) -> float:
    """Train and write the digits CNN; return its FP32 test accuracy."""
    params, accuracy = train_digits_cnn(epochs=epochs, seed=seed, **kw)
    cnn_to_onnx(params, path)
    return accuracy


def write_digits_npz(folder: str | Path, n_calibration: int = 200, flat: bool = False) -> tuple[Path, Path]:
    """calib.npz (training images) and eval.npz (held-out images with labels), as `convert` takes them.

    `flat=True` writes flat-calib.npz / flat-eval.npz for models that take 64-vectors (the wide MLP).
    """
    x_tr, _, x_te, y_te = digits_dataset()
    if flat:
        name, prefix, x_tr, x_te = MLP_INPUT, "flat-", x_tr.reshape(-1, 64), x_te.reshape(-1, 64)
    else:
        name, prefix = INPUT_NAME, ""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calib, evaluation = folder / f"{prefix}calib.npz", folder / f"{prefix}eval.npz"
    np.savez(calib, **{name: x_tr[:n_calibration]})
    np.savez(evaluation, **{name: x_te, "labels": y_te})
    return calib, evaluation


def build_wide_mlp(path: str | Path, hidden: int = 2240, seed: int = 0) -> Path:
    """An FP32 MLP on the flattened digits (64 -> hidden -> hidden -> hidden -> 10), He-initialised.

    Untrained on purpose: it exists to make bundles of a realistic size (hidden=2240 gives
    ~10 MB of INT8 weights) for the deploy benchmark, where only size and behaviour matter.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [64, hidden, hidden, hidden, 10]
    nodes, inits, prev = [], [], MLP_INPUT
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        out = OUTPUT_NAME if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if out == OUTPUT_NAME else f"{out}_pre"]))
        if out != OUTPUT_NAME:
            nodes.append(helper.make_node("Relu", [f"{out}_pre"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "wide_mlp",
                              [helper.make_tensor_value_info(MLP_INPUT, TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
                              initializer=inits)
    return _save(graph, path)



def build_stateful_rnn(path: str | Path, features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """A keyword-spotting-shaped recurrent model: frames [T, 1, F] and a hidden state h [1, 1, H]
    in, per-frame scores [T, 1, C] and the next state h_out out (an ONNX RNN with tanh, then a
    projection). Feeding h_out back as h continues the sequence exactly, however it is chunked."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.4, (1, hidden, features)).astype(np.float32)
    r = rng.normal(0, 0.3, (1, hidden, hidden)).astype(np.float32)
    b = rng.normal(0, 0.1, (1, 2 * hidden)).astype(np.float32)
    proj = rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)
    nodes = [
        helper.make_node("RNN", ["frames", "W", "R", "B", "", "h"], ["Y", "h_out"], hidden_size=hidden),
        helper.make_node("Squeeze", ["Y", "axis1"], ["Y3"]),              # [T, 1, H]
        helper.make_node("MatMul", ["Y3", "proj"], ["scores"]),            # [T, 1, C]
    ]
    graph = helper.make_graph(
        nodes, "stateful_rnn",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["T", 1, features]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["T", 1, classes]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 1, hidden])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"),
                     numpy_helper.from_array(b, "B"), numpy_helper.from_array(proj, "proj"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return _save(graph, path)


def build_mobilenet_like(path: str | Path, size: int = 96, classes: int = 10, seed: int = 0) -> Path:
    """An FP32 MobileNet-style CNN (depthwise-separable blocks, ReLU6) on [N, 3, size, size] images.

    Untrained (He-initialised): it gives the benchmarks an edge-sized vision workload whose
    cost per image is that of a real small classifier (about a millisecond on a desktop core).
    """
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    six = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    inits += [six, zero]

    def conv(x, cin, cout, k, stride, group, name):
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("Clip", [f"{name}_c", "zero", "six"], [name]))
        return name

    x = conv("image", 3, 16, 3, 2, 1, "stem")
    cin = 16
    for i, (stride, cout) in enumerate([(1, 32), (2, 64), (1, 64), (2, 128), (1, 128), (2, 256), (1, 256)]):
        x = conv(x, cin, cin, 3, stride, cin, f"dw{i}")
        x = conv(x, cin, cout, 1, 1, 1, f"pw{i}")
        cin = cout
    return _image_classifier(path, "mobilenet_like", nodes, inits, x, cin, size, classes, rng)


def build_mobilenet_v3_like(path: str | Path, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """An FP32 MobileNetV3-style CNN: hard-swish activations, inverted residual blocks whose
    squeeze-excite gate (a hard-sigmoid) scales each channel. Untrained (He-initialised)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, group, name, act="HardSwish"):
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(np.float32)
        b = (0.05 * rng.standard_normal(cout)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c" if act else name],
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        if act:
            nodes.append(helper.make_node(act, [f"{name}_c"], [name]))
        return name

    def squeeze_excite(x, c, name):
        nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{name}_pool"]))
        r = conv(f"{name}_pool", c, c // 4, 1, 1, 1, f"{name}_reduce", act="Relu")
        g = conv(r, c // 4, c, 1, 1, 1, f"{name}_expand", act="HardSigmoid")
        nodes.append(helper.make_node("Mul", [x, g], [name]))
        return name

    x, cin = conv("image", 3, 16, 3, 2, 1, "stem"), 16
    for i, (expand, cout, stride) in enumerate([(64, 24, 2), (96, 24, 1), (96, 40, 2)]):
        y = conv(x, cin, expand, 1, 1, 1, f"b{i}_expand")
        y = conv(y, expand, expand, 3, stride, expand, f"b{i}_dw")
        y = squeeze_excite(y, expand, f"b{i}_se")
        y = conv(y, expand, cout, 1, 1, 1, f"b{i}_project", act=None)
        if stride == 1 and cin == cout:
            nodes.append(helper.make_node("Add", [x, y], [f"b{i}"]))
            y = f"b{i}"
        x, cin = y, cout
    x = conv(x, cin, 96, 1, 1, 1, "head")
    return _image_classifier(path, "mobilenet_v3_like", nodes, inits, x, 96, size, classes, rng)


def build_text_detector_like(path: str | Path, size: int = 64, seed: int = 0, last_kernel: int = 2) -> Path:
    """An FP32 DBNet-style text detector, laid out as Paddle2ONNX writes PP-OCR's: a backbone of
    stride-2 convs with hard-swish (as Add, Clip, Mul, Div) and a learned scale and shift (Mul,
    Add) after each conv and activation, a feature pyramid upsampled by Resize (nearest, and one
    bilinear) and concatenated, and a head of Conv, BatchNormalization and two ConvTranspose that
    ends in a per-pixel probability map [batch, 1, size, size]. Untrained (He-initialised).
    `last_kernel` 4 makes the last ConvTranspose torch's kernel 4, stride 2, padding 1 instead
    of PP-OCR's kernel 2, stride 2 (its TFLite form then pads and crops as well)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    n = helper.make_node

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def affine(x, name):  # PP-OCRv4's learnable scale and shift: one value each for the tensor
        const(f"{name}_s", [1.0 + 0.2 * rng.standard_normal()])
        const(f"{name}_t", [0.1 * rng.standard_normal()])
        nodes.extend([n("Mul", [f"{name}_s", x], [f"{name}_m"]), n("Add", [f"{name}_m", f"{name}_t"], [name])])
        return name

    def hard_swish(x, name):
        const(f"{name}_3", 3.0), const(f"{name}_0", 0.0), const(f"{name}_6", 6.0)
        nodes.extend([n("Add", [x, f"{name}_3"], [f"{name}_a"]),
                      n("Clip", [f"{name}_a", f"{name}_0", f"{name}_6"], [f"{name}_c"]),
                      n("Mul", [x, f"{name}_c"], [f"{name}_m"]), n("Div", [f"{name}_m", f"{name}_6"], [name])])
        return name

    def conv(x, cin, cout, k, stride, name, group=1, act=True):
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))).astype(np.float32)
        nodes.append(n("Conv", [x, const(f"{name}_w", w), const(f"{name}_b", 0.05 * rng.standard_normal(cout))],
                       [f"{name}_c"], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        y = affine(f"{name}_c", f"{name}_aff")
        return affine(hard_swish(y, f"{name}_hs"), name) if act else y

    def resize(x, factor, name, mode="nearest"):
        const(f"{name}_roi", np.zeros(0)), const(f"{name}_scales", [1, 1, factor, factor])
        coords = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"} if mode == "nearest" \
            else {"coordinate_transformation_mode": "half_pixel"}
        nodes.append(n("Resize", [x, f"{name}_roi", f"{name}_scales"], [name], mode=mode, **coords))
        return name

    def batchnorm(x, c, name):
        nodes.append(n("BatchNormalization", [x, const(f"{name}_g", 1 + 0.1 * rng.standard_normal(c)),
                                              const(f"{name}_beta", 0.1 * rng.standard_normal(c)),
                                              const(f"{name}_mean", 0.1 * rng.standard_normal(c)),
                                              const(f"{name}_var", 1 + 0.1 * rng.random(c))], [name]))
        return name

    def transposed(x, cin, cout, name, bias: bool, k: int = 2):
        w = (rng.standard_normal((cin, cout, k, k)) * np.sqrt(2 / cin)).astype(np.float32)
        inputs = [x, const(f"{name}_w", w)] + ([const(f"{name}_b", 0.05 * rng.standard_normal(cout))] if bias else [])
        nodes.append(n("ConvTranspose", inputs, [name], kernel_shape=[k, k], strides=[2, 2], pads=[(k - 2) // 2] * 4))
        return name

    c2 = conv("image", 3, 8, 3, 2, "stem")                        # 1/2
    c4 = conv(conv(c2, 8, 8, 3, 2, "dw4", group=8), 8, 16, 1, 1, "pw4")    # 1/4
    c8 = conv(conv(c4, 16, 16, 3, 2, "dw8", group=16), 16, 24, 1, 1, "pw8")  # 1/8
    p8 = conv(c8, 24, 16, 1, 1, "lat8", act=False)
    p4 = conv(c4, 16, 16, 1, 1, "lat4", act=False)
    nodes.append(n("Add", [p4, resize(p8, 2, "up8")], ["p4"]))
    fused = [resize(conv(p8, 16, 4, 3, 1, "out8", act=False), 2, "out8_up", mode="linear"),
             conv("p4", 16, 4, 3, 1, "out4", act=False)]
    nodes.append(n("Concat", fused, ["fpn"], axis=1))              # 8 channels at 1/4
    nodes.append(n("Conv", ["fpn", const("head_w", rng.standard_normal((8, 8, 3, 3)) * np.sqrt(2 / 72))],
                   ["head_c"], kernel_shape=[3, 3], pads=[1] * 4))
    nodes.append(n("Relu", [batchnorm("head_c", 8, "head_bn")], ["head_r"]))
    up = transposed("head_r", 8, 8, "head_up1", bias=False)        # 1/2
    nodes.append(n("Relu", [batchnorm(up, 8, "head_bn2")], ["head_r2"]))
    nodes.append(n("Sigmoid", [transposed("head_r2", 8, 1, "head_up2", bias=True, k=last_kernel)], [OUTPUT_NAME]))
    graph = helper.make_graph(nodes, "text_detector_like",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1, size, size])],
                              initializer=inits)
    return _save(graph, path)


def build_strip_upsampler(path: str | Path, size: int = 32, seed: int = 0) -> Path:
    """A conv with a PReLU, and a ConvTranspose that doubles the height only (kernel 4x3, strides
    2x1, as a text-line or spectrogram decoder might) with a LeakyReLU: the one form the TFLite
    writer keeps as TRANSPOSE_CONV, in a model for batches of one. Out: [batch, 4, 2 * size,
    size]. Untrained."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "conv_w"),
             numpy_helper.from_array((rng.standard_normal((8, 4, 4, 3)) * 0.3).astype(np.float32), "up_w"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "up_b"),
             numpy_helper.from_array(rng.uniform(0.05, 0.3, (8, 1, 1)).astype(np.float32), "slope")]
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("PRelu", ["c", "slope"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "up_w", "up_b"], ["up"], kernel_shape=[4, 3],
                              strides=[2, 1], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["up"], [OUTPUT_NAME], alpha=0.1)]
    graph = helper.make_graph(nodes, "strip_upsampler",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                                             ["batch", 4, 2 * size, size])], initializer=inits)
    return _save(graph, path)


def build_conv1d_kws(path: str | Path, features: int = 40, frames: int = 98, classes: int = 12, seed: int = 0) -> Path:
    """An FP32 keyword spotter of TC-ResNet's shape: a second of audio as MFCC frames
    [N, features, frames], the features as channels, 1-D convs along time (a 3-tap stem, then
    three residual blocks of two 9-tap convs, the first of stride 2 with a 1x1 shortcut), ReLU,
    the mean over time and a classifier. Untrained (He-initialised): a board's always-on audio
    workload, and the 1-D conv path PyTorch's Conv1d exports take (converters/conv1d.py)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name, relu=True):
        w = (rng.standard_normal((cout, cin, k)) * np.sqrt(2 / (cin * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array((0.05 * rng.standard_normal(cout)).astype(np.float32), f"{name}_b")])
        out = f"{name}_c" if relu else name
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], kernel_shape=[k],
                                      strides=[stride], pads=[k // 2, k // 2]))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [name]))
        return name

    x, cin = conv("mfcc", features, 16, 3, 1, "stem"), 16
    for i, cout in enumerate((24, 32, 48)):
        y = conv(conv(x, cin, cout, 9, 2, f"b{i}_a"), cout, cout, 9, 1, f"b{i}_b", relu=False)
        shortcut = conv(x, cin, cout, 1, 2, f"b{i}_s", relu=False)
        nodes += [helper.make_node("Add", [y, shortcut], [f"b{i}_sum"]), helper.make_node("Relu", [f"b{i}_sum"], [f"b{i}"])]
        x, cin = f"b{i}", cout
    inits += [numpy_helper.from_array(np.array([2], np.int64), "time"),
              numpy_helper.from_array((rng.standard_normal((cin, classes)) * np.sqrt(1 / cin)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    nodes += [helper.make_node("ReduceMean", [x, "time"], ["pooled"], keepdims=0),
              helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "conv1d_kws",
                              [helper.make_tensor_value_info("mfcc", TensorProto.FLOAT, ["batch", features, frames])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
                              initializer=inits)
    return _save(graph, path, opset=18)


def _image_classifier(path, name: str, nodes: list, inits: list, x: str, channels: int, size: int, classes: int,
                      rng, opset: int = 17) -> Path:
    """Finish an image model: global average pool, a linear classifier, NCHW image in, logits out."""
    from onnx import TensorProto, helper, numpy_helper

    wf = (rng.standard_normal((channels, classes)) * np.sqrt(1 / channels)).astype(np.float32)
    inits += [numpy_helper.from_array(wf, "fc_w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
                              initializer=inits)
    return _save(graph, path, opset)


def _conv_act(rng, nodes: list, inits: list, x: str, cin: int, cout: int, k: int, stride: int, name: str,
              act: str) -> str:
    """A He-initialised conv with a small bias and "same" padding, then ReLU or SiLU (Sigmoid
    and Mul, as torch exports it), added to `nodes` and `inits`; its output is named `name`."""
    from onnx import helper, numpy_helper

    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
    b = (0.05 * rng.standard_normal(cout)).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                  strides=[stride, stride], pads=[k // 2] * 4))
    if act == "relu":
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
    else:
        nodes.extend([helper.make_node("Sigmoid", [f"{name}_c"], [f"{name}_s"]),
                      helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [name])])
    return name


def build_fire_cnn(path: str | Path, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """An FP32 SqueezeNet-style CNN: a stem, then "fire" modules whose 1x1 and 3x3 expand branches
    are concatenated along the channels, a global average pool and a classifier. Untrained."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name):
        return _conv_act(rng, nodes, inits, x, cin, cout, k, stride, name, "relu")

    x = conv("image", 3, 16, 3, 2, "stem")
    cin = 16
    for i, (squeeze, expand) in enumerate([(8, 16), (8, 16), (16, 32)]):
        s = conv(x, cin, squeeze, 1, 1, f"fire{i}_squeeze")
        a, b = conv(s, squeeze, expand, 1, 1, f"fire{i}_e1"), conv(s, squeeze, expand, 3, 1, f"fire{i}_e3")
        nodes.append(helper.make_node("Concat", [a, b], [f"fire{i}"], axis=1))
        x, cin = f"fire{i}", 2 * expand
        if i == 1:
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
    return _image_classifier(path, "fire_cnn", nodes, inits, x, cin, size, classes, rng)


def build_c2f_cnn(path: str | Path, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """An FP32 CNN of YOLOv8's parts: conv + SiLU (Sigmoid, Mul), a C2f block (a 1x1 conv split
    in two along the channels, a residual bottleneck on one half, the three concatenated),
    SPPF's 5x5 stride-1 max pools concatenated, and a Slice of the channels, then a global
    average pool and a classifier. Opset 13 (Split's sizes an input). Untrained."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name):
        return _conv_act(rng, nodes, inits, x, cin, cout, k, stride, name, "silu")

    def ints(name, values):
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    x = conv(conv("image", 3, 16, 3, 2, "stem"), 16, 16, 1, 1, "c2f_cv1")
    nodes.append(helper.make_node("Split", [x, ints("c2f_sizes", [8, 8])], ["c2f_a", "c2f_b"], axis=1))
    m = conv(conv("c2f_b", 8, 8, 3, 1, "c2f_m1"), 8, 8, 3, 1, "c2f_m2")
    nodes += [helper.make_node("Add", ["c2f_b", m], ["c2f_res"]),
              helper.make_node("Concat", ["c2f_a", "c2f_b", "c2f_res"], ["c2f_cat"], axis=1)]
    x = conv("c2f_cat", 24, 16, 1, 1, "c2f_cv2")
    nodes += [helper.make_node("MaxPool", [x], ["sppf_1"], kernel_shape=[5, 5], pads=[2] * 4),
              helper.make_node("MaxPool", ["sppf_1"], ["sppf_2"], kernel_shape=[5, 5], pads=[2] * 4),
              helper.make_node("Concat", [x, "sppf_1", "sppf_2"], ["sppf"], axis=1),
              helper.make_node("Slice", ["sppf", ints("cut_start", [4]), ints("cut_end", [44]), ints("cut_axis", [1])],
                               ["cut"])]
    return _image_classifier(path, "c2f_cnn", nodes, inits, "cut", 40, size, classes, rng, opset=13)


def write_image_npz(folder: str | Path, size: int = 96, n_calibration: int = 64, n_eval: int = 64,
                    seed: int = 0) -> tuple[Path, Path]:
    """Calibration and evaluation sets of smooth synthetic images (no download) for image models."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def images(n):
        low = rng.random((n, 3, size // 8, size // 8)).astype(np.float32)
        return np.repeat(np.repeat(low, 8, axis=2), 8, axis=3) + 0.05 * rng.standard_normal(
            (n, 3, size, size)).astype(np.float32)

    calib, evaluation = folder / "images-calib.npz", folder / "images-eval.npz"
    np.savez(calib, image=images(n_calibration))
    np.savez(evaluation, image=images(n_eval))
    return calib, evaluation


def build_tflite_mlp(path: str | Path, features: int = 64, hidden: int = 32, classes: int = 10,
                     seed: int = 0) -> tuple[Path, dict]:
    """A float TFLite MLP (features -> hidden, ReLU -> classes) written straight as a flatbuffer
    with LiteRT's own schema: a real .tflite for the runtimes' tests, without TensorFlow.
    Returns the path and the weights, so a test can compute the expected outputs with numpy."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(0, 0.3, (hidden, features)).astype(np.float32),
               "b1": rng.normal(0, 0.1, hidden).astype(np.float32),
               "w2": rng.normal(0, 0.3, (classes, hidden)).astype(np.float32),
               "b2": rng.normal(0, 0.1, classes).astype(np.float32)}

    def buffer(arr=None):
        b = s.BufferT()
        b.data = list(arr.tobytes()) if arr is not None else None
        return b

    def tensor(name, shape, buf, signature=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, buf
        t.shapeSignature = signature
        return t

    buffers = [buffer(), buffer(weights["w1"]), buffer(weights["b1"]), buffer(weights["w2"]), buffer(weights["b2"])]
    tensors = [tensor(MLP_INPUT, [1, features], 0, [-1, features]), tensor("w1", [hidden, features], 1),
               tensor("b1", [hidden], 2), tensor("h", [1, hidden], 0, [-1, hidden]),
               tensor("w2", [classes, hidden], 3), tensor("b2", [classes], 4),
               tensor(OUTPUT_NAME, [1, classes], 0, [-1, classes])]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1

    def fc(inputs, output, relu):
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, inputs, [output]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = s.FullyConnectedOptionsT()
        op.builtinOptions.fusedActivationFunction = (s.ActivationFunctionType.RELU if relu
                                                     else s.ActivationFunctionType.NONE)
        return op

    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs = tensors, [0], [6]
    graph.operators = [fc([0, 1, 2], 3, True), fc([3, 4, 5], 6, False)]
    graph.name = "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
    model.description = "edgeward.zoo tflite mlp"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path, weights


def build_keras_digits_transformer(path: str | Path, epochs: int = 20, seed: int = 0, width: int = 32,
                                   heads: int = 4) -> float:
    """Train and save (.keras) a small Keras transformer on the digits; return its FP32 test
    accuracy. The Keras counterpart of build_digits_transformer, built from Keras' own layers as
    Keras users build theirs: Dense on the 8 row tokens, MultiHeadAttention, post-norm
    LayerNormalization, a GELU Dense MLP, GlobalAveragePooling1D. TensorFlow's TFLite converter
    writes its LayerNorms as MEAN, SQUARED_DIFFERENCE, RSQRT, NEG and MULs, and its Dense layers
    on tokens as FULLY_CONNECTED with keep_num_dims. Takes the digits CNN's [N, 1, 8, 8] input.
    Needs TensorFlow (edgeward[tensorflow])."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    keras, layers = tf.keras, tf.keras.layers
    keras.utils.set_random_seed(seed)
    image = keras.Input((1, 8, 8), name=INPUT_NAME)
    x = layers.Dense(width)(layers.Reshape((8, 8))(image))
    x = layers.LayerNormalization()(x + layers.MultiHeadAttention(heads, width // heads)(x, x))
    x = layers.LayerNormalization()(x + layers.Dense(width)(layers.Dense(2 * width, activation="gelu")(x)))
    model = keras.Model(image, layers.Dense(10)(layers.GlobalAveragePooling1D()(x)))
    x_tr, y_tr, x_te, y_te = digits_dataset()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_tr, y_tr, epochs=epochs, batch_size=64, verbose=0)
    model.save(path)
    return float((model.predict(x_te, verbose=0).argmax(1) == y_te).mean())


def build_digits_transformer(path: str | Path, epochs: int = 40, seed: int = 0, width: int = 32,
                             heads: int = 2) -> float:
    """Train and write a small transformer on the digits; return its FP32 test accuracy.

    Each of the 8 image rows is a token of 8 pixels: an embedding and a learned position, one
    pre-norm encoder block (multi-head self-attention written out as q, k, v projections,
    Q Kᵀ / √d, softmax, × V; then a GELU MLP), a final LayerNorm, the tokens' mean and a
    classifier. It is the shape of a keyword-spotting or small ViT-style model, exported by
    torch.onnx.export as users export theirs (LayerNormalization, GELU as Erf, MatMul of two
    activations), and it takes the digits CNN's [N, 1, 8, 8] input. Needs torch (edgeward[torch])."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    head_dim = width // heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))
            self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

        def forward(self, x):
            n, t, _ = x.shape
            h = self.norm1(x)
            q, k, v = (f(h).reshape(n, t, heads, head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
            attention = torch.softmax(q @ k.transpose(2, 3) / head_dim ** 0.5, dim=-1)
            x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, width))
            return x + self.mlp(self.norm2(x))

    class DigitsTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, width)
            self.position = nn.Parameter(torch.randn(1, 8, width) * 0.1)
            self.block, self.norm, self.head = Block(), nn.LayerNorm(width), nn.Linear(width, 10)

        def forward(self, image):
            x = self.embed(image.reshape(image.shape[0], 8, 8)) + self.position
            return self.head(self.norm(self.block(x)).mean(dim=1))

    return _train_on_digits(DigitsTransformer(), path, epochs, 3e-3, seed)


def build_digits_rnn(path: str | Path, kind: str = "GRU", epochs: int = 15, seed: int = 0, hidden: int = 32,
                     layers: int = 1, bidirectional: bool = False) -> float:
    """Train and write a recurrent classifier on the digits; return its FP32 test accuracy.

    The 8 image rows are 8 steps of 8 pixels through a PyTorch GRU or LSTM (batch_first, as
    sequence models are usually written), and the last step's output is classified: the shape of
    a keyword spotter or a sensor model, exported by torch.onnx.export as users export theirs
    (Transpose, the ONNX GRU/LSTM, Gather of the last step). It takes the digits CNN's
    [N, 1, 8, 8] input. Needs torch (edgeward[torch])."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DigitsRnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(8, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear(hidden * (2 if bidirectional else 1), 10)

        def forward(self, image):
            y, _ = self.rnn(image.reshape(image.shape[0], 8, 8))
            return self.head(y[:, -1])

    return _train_on_digits(DigitsRnn(), path, epochs, 1e-2, seed)


def _train_on_digits(model, path: str | Path, epochs: int, lr: float, seed: int) -> float:
    """Train a torch module on the digits (Adam, batches of 64), export it to ONNX as users do;
    return its FP32 test accuracy."""
    import torch
    from torch import nn

    from .from_torch import to_onnx

    x_tr, y_tr, x_te, y_te = digits_dataset()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    to_onnx(model, {INPUT_NAME: x_tr[:4]}, path)
    return accuracy


SSD_OPTIONS = {"max_detections": 10, "max_classes_per_detection": 1, "detections_per_class": 100,
               "use_regular_nms": False, "nms_score_threshold": 0.3, "nms_iou_threshold": 0.6,
               "y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0, "w_scale": 5.0}


def build_ssd_tflite(path: str | Path, size: int = 32, classes: int = 3, width: int = 32, seed: int = 0,
                     class_bias: float = -2.0, colour_gain: float = 8.0, **options) -> Path:
    """A float .tflite SSD-style detector as TensorFlow's object detection API exports one: a
    depthwise-separable backbone on [1, size, size, 3] images, box and class heads for 2 anchors
    on each cell of a size/4 grid, sigmoid scores (a background column first), and
    TFLite_Detection_PostProcess at the end: boxes [1, 10, 4], classes, scores [1, 10] and the
    count [1]. The converter fuses the op from a function marked with its name and options, as
    the API's export does. The box encodings come from random (He-initialised) weights; the class
    scores from each 4x4 cell's mean colour: class k where colour channel k stands out (by
    `colour_gain`, against `class_bias`), so an image of coloured blocks gets detections of
    each class where its blocks are. Needs TensorFlow (edgeward[tensorflow])."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    opts = {**SSD_OPTIONS, **options, "num_classes": classes}

    def attr(key, value):
        kind = "b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f"
        text = str(value).lower() if isinstance(value, bool) else f"{value:f}" if kind == "f" else str(value)
        return f'attr {{ key: "{key}" value {{ {kind}: {text} }} }}'

    implements = " ".join(['name: "TFLite_Detection_PostProcess"', *(attr(k, v) for k, v in opts.items())])
    rng = np.random.default_rng(seed)
    grid = size // 4
    centres = (np.arange(grid) + 0.5) / grid
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    anchors = np.concatenate([np.stack([ys.ravel(), xs.ravel(), np.full(grid * grid, s), np.full(grid * grid, s)], 1)
                              for s in (0.2, 0.4)]).astype(np.float32)
    anchors = anchors.reshape(2, grid * grid, 4).transpose(1, 0, 2).reshape(-1, 4)  # cell by cell, as the heads

    def he(*shape, fan_in):
        return tf.constant(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32))

    def bias(n):
        return tf.constant(rng.normal(0, 0.1, n).astype(np.float32))

    stem, stem_b = he(3, 3, 3, width // 2, fan_in=27), bias(width // 2)
    dw, dw_b = he(3, 3, width // 2, 1, fan_in=9), bias(width // 2)
    pw, pw_b = he(1, 1, width // 2, width, fan_in=width // 2), bias(width)
    box_w, box_b = he(1, 1, width, 2 * 4, fan_in=width), bias(2 * 4)
    # class k (of 3) is a cell whose colour channel k stands out: the scores read each cell's mean colour
    colour = np.zeros((1, 1, 3, 2, classes + 1), np.float32)
    for k in range(classes):
        colour[0, 0, :, :, k + 1] = colour_gain * (np.eye(3)[k % 3] - 1 / 3)[:, None] * (1 + 0.25 * np.arange(2))
    cls_w = tf.constant(colour.reshape(1, 1, 3, 2 * (classes + 1)))
    cls_b = tf.constant(np.tile(np.r_[0.0, np.full(classes, class_bias)], 2).astype(np.float32))

    @tf.function(experimental_implements=implements)
    def post_process(box_encodings, class_scores, anchor_boxes):  # replaced by the op when converted
        return (tf.constant(0.0, name="boxes"), tf.constant(0.0, name="classes"),
                tf.constant(0.0, name="scores"), tf.constant(0.0, name="num_detections"))

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="image")])
    def detect(image):
        x = tf.nn.relu6(tf.nn.conv2d(image, stem, 2, "SAME") + stem_b)
        x = tf.nn.relu6(tf.nn.depthwise_conv2d(x, dw, [1, 2, 2, 1], "SAME") + dw_b)
        x = tf.nn.relu6(tf.nn.conv2d(x, pw, 1, "SAME") + pw_b)
        boxes = tf.reshape(tf.nn.conv2d(x, box_w, 1, "SAME") + box_b, [1, -1, 4])
        cells = tf.nn.avg_pool2d(image, 4, 4, "VALID")
        scores = tf.sigmoid(tf.reshape(tf.nn.conv2d(cells, cls_w, 1, "VALID") + cls_b, [1, -1, classes + 1]))
        return post_process(boxes, scores, tf.constant(anchors))

    holder = tf.Module()
    holder.detect = detect
    converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], holder)
    converter.allow_custom_ops = True
    path = Path(path)
    path.write_bytes(converter.convert())
    return path


def build_mediapipe_ssd_tflite(path: str | Path, size: int = 64, seed: int = 0) -> Path:
    """A float .tflite laid out as MediaPipe's face and palm detectors are: [1, size, size, 3]
    images in, box regressors [1, A, 16] (x and y offsets from the anchor, width, height, in
    input pixels, then 6 keypoints) and class logits [1, A, 1] out, for the anchors of strides
    8:16:16:16 with 2 per layer and cell (A = 2 (size/8)^2 + 6 (size/16)^2, 224 at 64x64).
    Random weights; widths and heights kept positive (4 px and up), as a trained model's are;
    logits read each cell's brightness, so bright blocks are "found". Needs TensorFlow."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def he(*shape, fan_in):
        return tf.constant(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32))

    stem, down, down2 = he(3, 3, 3, 16, fan_in=27), he(3, 3, 16, 16, fan_in=144), he(3, 3, 16, 16, fan_in=144)
    reg8, reg16 = he(1, 1, 16, 2 * 16, fan_in=16), he(1, 1, 16, 6 * 16, fan_in=16)
    cls8, cls16 = he(1, 1, 3, 2, fan_in=3), he(1, 1, 3, 6, fan_in=3)

    def regress(x, w, per_cell):
        r = tf.reshape(tf.nn.conv2d(x, w, 1, "SAME"), [1, -1, 16])
        return tf.concat([r[..., :2] * 4.0, tf.nn.relu(r[..., 2:4]) * 12.0 + 4.0, r[..., 4:]], -1)

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="input")])
    def detect(image):
        x = tf.nn.relu(tf.nn.conv2d(image, stem, 2, "SAME"))
        x8 = tf.nn.relu(tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(x, down, 2, "SAME")), down, 2, "SAME"))
        x16 = tf.nn.relu(tf.nn.conv2d(x8, down2, 2, "SAME"))
        regressors = tf.concat([regress(x8, reg8, 2), regress(x16, reg16, 6)], 1)
        bright8 = tf.nn.avg_pool2d(image, 8, 8, "VALID")
        bright16 = tf.nn.avg_pool2d(image, 16, 16, "VALID")
        logits = tf.concat([tf.reshape(tf.nn.conv2d(bright8, cls8, 1, "SAME"), [1, -1, 1]),
                            tf.reshape(tf.nn.conv2d(bright16, cls16, 1, "SAME"), [1, -1, 1])], 1)
        return {"regressors": regressors, "classificators": logits * 3.0}

    path = Path(path)
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()]).convert())
    return path
