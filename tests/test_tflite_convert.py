"""The TFLite output of the converter: full-integer INT8 (and float) .tflite files written by
edgeward's own writer from ONNX, checked op by op and dtype by dtype, measured against the FP32
ONNX model with explicit tolerances, and served by a real agent engine through LiteRT.

tflite-runtime 2.14 runs the same bundles in scripts/test-oldest-board.sh (tests/test_tflite.py)."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.errors import ConversionError, InferenceError
from agent.signing import load_public_key
from agent.store import Store
from converters import zoo
from converters.convert import ConvertOptions, convert_onnx
from converters.measure import TfliteSession
from converters.onnx_to_tflite import calibration_ranges, lower
from converters.tflite_graph import op_counts, write_tflite
from tflitekit import op_dtypes, xnnpack_partitions


def _onnx_out(path, name, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


def _tflite_out(path, name, x):
    """The model's first output for all rows, in batches of its fixed size where it has one."""
    from converters.measure import run_all

    session = TfliteSession(path)
    return run_all(session, {name: x})[session.get_outputs()[0].name]


def _member(bundle: Path, name: str, out: Path) -> Path:
    with tarfile.open(bundle) as tar:
        out.write_bytes(tar.extractfile(name).read())
    return out


@pytest.fixture(scope="module")
def digits_tflite(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits-tflite")
    report = convert_onnx(assets.fp32_v2, assets.calib, tmp / "digits.ewb", assets.key, assets.eval,
                          ConvertOptions(name="digits", version=3, format="tflite"))
    return report, tmp / "digits.ewb", _member(tmp / "digits.ewb", "model.tflite", tmp / "model.tflite")


def test_the_digits_cnn_becomes_a_full_integer_int8_tflite(digits_tflite):
    report, _, model = digits_tflite
    counts = op_counts(model)
    assert counts["ops"]["CONV_2D"] == 1 and counts["ops"]["FULLY_CONNECTED"] == 2
    assert counts["ops"]["QUANTIZE"] == 1 and counts["ops"]["DEQUANTIZE"] == 1   # float I/O, int8 inside
    # only the model's float input and output remain float32: every weight and activation is int8
    assert counts["tensor_dtypes"]["float32"] == 2
    assert counts["tensor_dtypes"]["int8"] >= 9
    assert report["format"] == "tflite" and report["int8_vs_fp32"] <= 0.45
    mem = report["memory"]  # measured in a fresh process: python + numpy + LiteRT + this model
    assert mem["runtime_mb"] > 1 and mem["peak_mb"] > mem["runtime_mb"] + mem["load_mb"] and mem["peak_mb"] < 200


def test_int8_tflite_stays_close_to_fp32(assets, digits_tflite):
    _, _, model = digits_tflite
    with np.load(assets.eval) as d:
        x, y = d["input"], d["labels"]
    fp32 = _onnx_out(assets.fp32_v2, "input", x)
    int8 = _tflite_out(model, "input", x)
    agreement = (fp32.argmax(1) == int8.argmax(1)).mean()
    drop_pp = 100 * ((fp32.argmax(1) == y).mean() - (int8.argmax(1) == y).mean())
    assert agreement >= 0.98, agreement
    assert drop_pp <= 1.0, drop_pp
    assert np.abs(fp32 - int8).mean() <= 0.01 * (fp32.max() - fp32.min())


def test_the_tflite_bundle_serves_in_the_agent_and_passes_its_self_test(assets, digits_tflite, tmp_path):
    report, bundle, _ = digits_tflite
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path).install(open_bundle(bundle, [load_public_key(assets.pub)])))
    assert model.manifest.format == "tflite" and model.manifest.runtime == "tflite"
    assert model.self_test()["max_abs_err"] <= model.manifest.selftest.atol
    engine.activate(model)
    x = assets.eval_inputs(5)
    out = engine.infer_arrays("digits", {"input": x})[1]["logits"]
    np.testing.assert_allclose(out, _tflite_out(digits_tflite[2], "input", x), atol=1e-5)
    assert (out.argmax(1) == _onnx_out(assets.fp32_v2, "input", x).argmax(1)).mean() >= 0.8
    engine.close()


@pytest.mark.parametrize("build,npz,name", [
    (zoo.build_mobilenet_like, zoo.write_image_npz, "image"),
    (zoo.build_fire_cnn, lambda d: zoo.write_image_npz(d, size=32), "image"),
    (lambda p: zoo.build_wide_mlp(p, hidden=96), lambda d: zoo.write_digits_npz(d, flat=True), "features"),
], ids=["mobilenet-like", "squeezenet-like", "mlp"])
def test_the_float_tflite_computes_what_the_onnx_model_computes(tmp_path, build, npz, name):
    """Layout (NCHW->NHWC, flatten order), explicit padding of stride-2 convs, depthwise and pooling
    are mapped exactly: the float .tflite matches onnxruntime to float rounding."""
    build(tmp_path / "m.onnx")
    calib, _ = npz(tmp_path)
    x = np.load(calib)[name][:8]
    graph = lower(onnx.load(str(tmp_path / "m.onnx")))
    write_tflite(graph, tmp_path / "m.tflite")
    ref = _onnx_out(tmp_path / "m.onnx", name, x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "m.tflite", name, x), ref,
                               atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_int8_io_takes_quantized_inputs_and_says_how_in_the_manifest(assets, tmp_path):
    report = convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "d.ewb", assets.key, assets.eval,
                          ConvertOptions(name="digits", format="tflite", tflite_int8_io=True))
    manifest = open_bundle(tmp_path / "d.ewb", [load_public_key(assets.pub)]).manifest
    (inp,), (out,) = manifest.inputs, manifest.outputs
    assert inp.dtype == "int8" and out.dtype == "int8"
    assert 0 < inp.scale < 1 and -128 <= inp.zero_point <= 127 and out.scale > 0
    counts = op_counts(_member(tmp_path / "d.ewb", "model.tflite", tmp_path / "m.tflite"))
    assert "QUANTIZE" not in counts["ops"] and "DEQUANTIZE" not in counts["ops"]
    assert "float32" not in counts["tensor_dtypes"]
    assert report["quality"]["top1_agreement"] >= 0.98
    # a caller quantizes with the manifest's scale and zero point and gets int8 logits back
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "d.ewb",
                                                                     [load_public_key(assets.pub)])))
    model.self_test()
    engine.activate(model)
    x = assets.eval_inputs(8)
    q = np.clip(np.round(x / inp.scale) + inp.zero_point, -128, 127).astype(np.int8)
    logits_q = engine.infer_arrays("digits", {"input": q})[1]["logits"]
    assert logits_q.dtype == np.int8
    logits = (logits_q.astype(np.float32) - out.zero_point) * out.scale
    fp32 = _onnx_out(assets.fp32_v2, "input", x)
    assert (logits.argmax(1) == fp32.argmax(1)).mean() >= 0.85
    engine.close()


def test_a_layer_kept_in_float_is_dequantized_around(assets, tmp_path):
    graph = lower(onnx.load(str(assets.fp32_v2)))
    with np.load(assets.calib) as d:
        x = d["input"]
    ranges = calibration_ranges(assets.fp32_v2, graph, {"input": x})
    last = graph.layers()[-1]
    write_tflite(graph, tmp_path / "all.tflite", ranges)
    write_tflite(graph, tmp_path / "kept.tflite", ranges, float_ops={last})
    all_int8, kept = op_counts(tmp_path / "all.tflite"), op_counts(tmp_path / "kept.tflite")
    assert kept["ops"]["DEQUANTIZE"] == all_int8["ops"]["DEQUANTIZE"]  # the float layer's output is the model's
    assert kept["tensor_dtypes"]["float32"] == all_int8["tensor_dtypes"]["float32"] + 3  # in, weights, bias
    ref = _onnx_out(assets.fp32_v2, "input", x)
    err_all = np.abs(_tflite_out(tmp_path / "all.tflite", "input", x) - ref).mean()
    err_kept = np.abs(_tflite_out(tmp_path / "kept.tflite", "input", x) - ref).mean()
    assert err_kept < err_all


def test_the_accuracy_guard_searches_tflite_settings(assets, tmp_path):
    report = convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "g.ewb", assets.key, assets.eval,
                          ConvertOptions(name="digits", format="tflite", max_drop=0.0))
    assert report["search"]["attempts"] and report["quality"]["accuracy_drop_pp"] <= 0.0


def test_format_both_writes_one_bundle_per_runtime(assets, tmp_path):
    out = tmp_path / "digits.ewb"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(assets.fp32_v1), "--calibration",
                           str(assets.calib), "--eval", str(assets.eval), "--format", "both", "--key", str(assets.key),
                           "-o", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {report["format"], report["also"]["format"]} == {"tflite", "onnx"}
    assert not out.exists()
    for fmt, runtime in (("tflite", "tflite"), ("onnx", "onnxruntime")):
        manifest = open_bundle(tmp_path / f"digits-{fmt}.ewb", [load_public_key(assets.pub)]).manifest
        assert manifest.format == fmt and manifest.runtime == runtime


def _model_with(op_type, tmp_path, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node(op_type, ["h"], ["y"],
                                                                                        name="odd", **attrs)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((32, 4), dtype=np.float32))
    return tmp_path / "m.onnx"


def test_an_operator_without_a_tflite_mapping_is_one_clear_error_and_leaves_nothing(tmp_path):
    model = _model_with("Erf", tmp_path)
    out = tmp_path / "m.ewb"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(model), "--calibration",
                           str(tmp_path / "calib.npz"), "--format", "tflite", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Erf" in lines[0] and "--format onnx" in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.ewb*"))


def test_dynamic_int8_has_no_tflite_form(tmp_path):
    with pytest.raises(ConversionError, match="--format onnx"):
        convert_onnx(_model_with("Relu", tmp_path), tmp_path / "calib.npz", tmp_path / "m.ewb",
                     options=ConvertOptions(format="tflite", precision="int8-dynamic"))


def test_dynamic_image_sizes_take_the_calibration_shape(assets, tmp_path):
    """An ONNX model exported with dynamic height and width becomes a TFLite model of the size the
    calibration data has (TFLite needs them fixed); the batch axis stays dynamic."""
    model = onnx.load(str(assets.fp32_v2))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, str(tmp_path / "dyn.onnx"))
    convert_onnx(tmp_path / "dyn.onnx", assets.calib, tmp_path / "d.ewb", assets.key, assets.eval,
                 ConvertOptions(name="digits", format="tflite"))
    manifest = open_bundle(tmp_path / "d.ewb", [load_public_key(assets.pub)]).manifest
    assert manifest.inputs[0].shape == [-1, 1, 8, 8]


def test_concatenated_branches_are_brought_to_one_scale(tmp_path):
    """SqueezeNet-style fire modules: each CONCATENATION's int8 inputs share its output's scale
    (requantized where a branch's differs), and the INT8 model stays close to FP32."""
    zoo.build_fire_cnn(tmp_path / "f.onnx")
    calib, evaluation = zoo.write_image_npz(tmp_path, size=32)
    report = convert_onnx(tmp_path / "f.onnx", calib, tmp_path / "f.ewb", None, evaluation,
                          ConvertOptions(name="fire", format="tflite", allow_worse=True))
    assert report["graph"]["ops"]["CONCATENATION"] == 3
    assert report["graph"]["tensor_dtypes"]["float32"] == 2
    assert report["quality"]["top1_agreement"] >= 0.9
    assert report["quality"]["mean_abs_err"] <= 0.02 * report["quality"]["output_range"]
    model = _member(tmp_path / "f.ewb", "model.tflite", tmp_path / "f.tflite")
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    details = {d["index"]: d for d in it.get_tensor_details()}
    for op in it._get_ops_details():
        if op["op_name"] == "CONCATENATION":
            scales = {details[i]["quantization"] for i in list(op["inputs"]) + list(op["outputs"])}
            assert len(scales) == 1, scales


def test_the_self_test_input_travels_as_codes_of_the_quantize_op(digits_tflite, tmp_path):
    from agent import reference
    from agent.runtimes.tflite import TfliteRuntime

    _, bundle, model = digits_tflite
    ref = _member(bundle, "reference.npz", tmp_path / "reference.npz")
    with np.load(ref) as r:
        assert r["input.input"].dtype == np.int8 and "input_scale.input" in r.files
    feeds, want = reference.load(ref, ["input"], "digits")
    got = TfliteRuntime(str(model)).run(feeds)
    assert np.allclose(got["logits"], want["logits"], atol=1e-6)


def _torch_default_export(path, keepdims: int):
    """What torch.onnx.export writes by default now (its dynamo exporter): opset 18+, where
    ReduceMean takes its axes as an input, a batch fixed at the traced size, and every weight in
    an external NAME.onnx.data file beside the graph."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (32, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 32, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, 64).astype(np.float32), "b2")
    fc = numpy_helper.from_array(rng.normal(0, 0.3, (10, 64)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(np.zeros(10, np.float32), "fcb")
    axes = numpy_helper.from_array(np.array([-1, -2], np.int64), "axes")
    flat = numpy_helper.from_array(np.array([1, 64], np.int64), "flat")
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ReduceMean", ["r2", "axes"], ["m"], keepdims=keepdims)]
    nodes += [helper.make_node("Reshape", ["m", "flat"], ["v"])] if keepdims else []
    nodes += [helper.make_node("Gemm", ["v" if keepdims else "m", "fc", "fcb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "torch_default",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
                              [w, b, w2, b2, fc, fcb, axes, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")  # tensors over 1 kB go there, as torch does
    return path


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_model_as_torch_exports_it_by_default_converts_to_both_formats(assets, tmp_path, fmt, keepdims):
    source = _torch_default_export(tmp_path / "m.onnx", keepdims)
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size > (tmp_path / "m.onnx").stat().st_size  # the weights are beside the graph
    np.savez(tmp_path / "calib.npz", image=np.random.default_rng(1).random((37, 3, 16, 16), dtype=np.float32))
    report = convert_onnx(source, tmp_path / "calib.npz", tmp_path / "m.ewb", assets.key,
                          options=ConvertOptions(name="tdefault", format=fmt, allow_worse=True))
    fp32_file = data.stat().st_size + source.stat().st_size if fmt == "onnx" else report["fp32_bytes"]
    assert report["fp32_bytes"] == fp32_file and report["int8_vs_fp32"] < 0.4
    assert report["quality"]["samples"] == 37 and report["quality"]["top1_agreement"] >= 0.9
    if fmt == "tflite":
        assert report["graph"]["ops"]["MEAN"] == 1 and report["graph"]["tensor_dtypes"]["float32"] == 2
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "m.ewb", [load_public_key(assets.pub)])))
    assert model.manifest.inputs[0].shape == [1, 3, 16, 16] and model.self_test()["top1_agreement"] == 1.0
    engine.close()


def test_a_float_model_with_its_weights_beside_it_ships_as_one_file(assets, tmp_path):
    """--precision fp32 ships the user's file; when its weights lie in NAME.onnx.data, the bundle's
    model.onnx takes them in (a bundle carries one model file) and the board loads and self-tests it."""
    source = _torch_default_export(tmp_path / "m.onnx", keepdims=1)
    np.savez(tmp_path / "calib.npz", image=np.random.default_rng(1).random((16, 3, 16, 16), dtype=np.float32))
    report = convert_onnx(source, tmp_path / "calib.npz", tmp_path / "f.ewb", assets.key,
                          options=ConvertOptions(name="float", precision="fp32"))
    assert report["quality"]["max_abs_err"] == 0.0
    shipped = onnx.load(str(_member(tmp_path / "f.ewb", "model.onnx", tmp_path / "shipped.onnx")),
                        load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in shipped.graph.initializer)
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "f.ewb", [load_public_key(assets.pub)])))
    assert model.self_test()["max_abs_err"] == 0.0
    engine.close()


# ------------------------------------------------------------------ MobileNetV3-style layers

def _mobilenet_v3_style(seed: int = 0):
    """A small MobileNetV3: hard-swish activations, inverted residual blocks with a
    squeeze-excite gate (hard-sigmoid) that scales each channel, batch norms with statistics
    that are not the identity."""
    import torch
    from torch import nn

    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            w = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(w))))

    class Block(nn.Module):
        def __init__(self, cin, cexp, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish(),
                nn.Conv2d(cexp, cexp, 3, stride, 1, groups=cexp, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish(),
                SqueezeExcite(cexp), nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                Block(16, 64, 24, 2), Block(24, 96, 24, 1), nn.Conv2d(24, 96, 1), nn.Hardswish())
            self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_a_mobilenet_v3_style_net_becomes_full_integer_tflite_without_hard_swish_ops(assets, tmp_path):
    """Hard-swish is x * relu6(x + 3) / 6 in ops that XNNPACK runs in int8 (its HARD_SWISH has
    no int8 kernel there: seven of them made this net's INT8 model 5x slower than FP32), the
    hard-sigmoid gate likewise, and the gate scales [N, H, W, C] by [N, 1, 1, C]."""
    from converters.from_torch import convert_torch, to_onnx

    net = _mobilenet_v3_style()
    x = np.random.default_rng(0).standard_normal((96, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x[:64])
    np.savez(tmp_path / "eval.npz", input=x[64:])
    onnx_path, _ = to_onnx(net, {"input": x[:2]}, tmp_path / "mv3.onnx")
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"HardSwish", "HardSigmoid", "Mul"} <= ops  # what torch.onnx.export writes for these layers

    graph = lower(onnx.load(str(onnx_path)))  # the float TFLite computes what ONNX computes
    write_tflite(graph, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "input", x[64:]),
                               _onnx_out(onnx_path, "input", x[64:]), rtol=0, atol=1e-4)

    out = tmp_path / "mv3.ewb"
    report = convert_torch(net, {"input": x[:2]}, tmp_path / "calib.npz", out, assets.key, tmp_path / "eval.npz",
                           ConvertOptions(name="mv3", format="tflite", allow_worse=True))
    counts = report["graph"]
    assert "HARD_SWISH" not in counts["ops"] and counts["ops"]["MUL"] >= 10 and counts["ops"]["ADD"] >= 8
    assert counts["tensor_dtypes"]["float32"] == 2  # the float I/O: every weight and activation is int8
    # the three global pools (two squeeze-excite gates, the classifier's) are int8 MEANs, which
    # XNNPACK takes: the whole model runs as one XNNPACK partition (an int8 AVERAGE_POOL_2D would
    # split it at each pool)
    assert counts["ops"]["MEAN"] == 3 and "AVERAGE_POOL_2D" not in counts["ops"]
    assert xnnpack_partitions(_member(out, "model.tflite", tmp_path / "mv3.tflite")) == 1
    q = report["quality"]
    assert q["top1_agreement"] >= 0.9 and q["max_abs_err"] <= 0.1 * q["output_range"], q

    store = Store(tmp_path / "store")
    engine = Engine(Budget(8192, reserve_mb=0))
    model = engine.load(store.install(open_bundle(out, [load_public_key(assets.pub)])))
    assert model.self_test()["max_abs_err"] <= model.manifest.selftest.atol
    engine.close()


def _paddle_style(path):
    """What Paddle2ONNX writes at opset 11 for a MobileNetV3 classifier (the PP-OCR angle
    classifier that rapidocr-onnxruntime ships is built so): hard-swish as
    Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6), a conv bias as Add(conv, Reshape(bias, shape)),
    HardSigmoid(alpha 0.2), and a flatten as Reshape(x, Concat(Shape(x)[0:1], [-1]))."""
    rng = np.random.default_rng(0)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f"  # noqa: E731
                                                            else np.int64), name)
    inits = [c("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), c("three", 3.0), c("six", 6.0), c("zero", 0.0),
             c("w2", rng.normal(0, 0.4, (8, 8, 1, 1))), c("b2", rng.normal(0, 0.1, 8)), c("b2_shape", [1, 8, 1, 1]),
             c("fc", rng.normal(0, 0.4, (8, 4))), c("fc_b", rng.normal(0, 0.1, 4)),
             c("starts", [0]), c("ends", [1]), c("minus_one", [-1])]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             n("Add", ["c1", "three"], ["a1"], name="hs_add"), n("Clip", ["a1", "zero", "six"], ["k1"], name="hs_clip"),
             n("Mul", ["c1", "k1"], ["m1"], name="hs_mul"), n("Div", ["m1", "six"], ["h1"], name="hs_div"),
             n("GlobalAveragePool", ["h1"], ["p1"], name="se_pool"),
             n("Conv", ["p1", "w2"], ["c2"], name="se_conv"),
             n("Reshape", ["b2", "b2_shape"], ["b2r"], name="bias_reshape"),
             n("Add", ["c2", "b2r"], ["c2b"], name="se_bias"),
             n("HardSigmoid", ["c2b"], ["g"], alpha=0.2, beta=0.5, name="se_gate"),
             n("Mul", ["h1", "g"], ["s1"], name="se_scale"),
             n("GlobalAveragePool", ["s1"], ["p2"], name="pool"),
             n("Shape", ["p2"], ["shp"], name="shape"), n("Cast", ["shp"], ["shp64"], to=TensorProto.INT64, name="cast"),
             n("Slice", ["shp64", "starts", "ends"], ["batch"], name="slice"),
             n("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0, name="concat"),
             n("Reshape", ["p2", "flat_shape"], ["flat"], name="flatten"),
             n("MatMul", ["flat", "fc"], ["mm"], name="fc"), n("Add", ["mm", "fc_b"], ["logits"], name="fc_bias")]
    graph = helper.make_graph(nodes, "paddle_style", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_paddle_style_opset_11_model_converts_to_tflite(assets, tmp_path):
    model = _paddle_style(tmp_path / "paddle.onnx")
    x = np.random.default_rng(1).standard_normal((80, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:48])
    np.savez(tmp_path / "eval.npz", x=x[48:])
    from converters.onnx_graph import upgrade_opset

    graph = lower(upgrade_opset(onnx.load(str(model)))[0])
    write_tflite(graph, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x[48:]), _onnx_out(model, "x", x[48:]),
                               rtol=0, atol=1e-4)
    out = tmp_path / "paddle.ewb"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(model), "--calibration",
                           str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--format", "tflite",
                           "--allow-worse", "-o", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["graph"]["tensor_dtypes"]["float32"] == 2
    q = report["quality"]
    assert q["max_abs_err"] <= 0.05 * q["output_range"] and q["top1_agreement"] >= 0.9, q


def test_a_shape_may_only_reach_a_reshape(tmp_path):
    """A constant made from a tensor's shape holds 0 for the free batch, which only a Reshape
    reads right: anything else that computes with it is refused by name."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["x", "sf"], ["y"], name="scale_by_shape")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConversionError, match="scale_by_shape.* computed from a tensor's shape"):
        lower(model)


def _upsampler(path, op, **attrs):
    """A conv, then one upsampling layer (Resize or ConvTranspose) as exporters write it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.4 * rng.standard_normal((6, 3, 3, 3))).astype(np.float32), "w0")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], kernel_shape=[3, 3], pads=[1] * 4, name="conv")]
    if op == "Resize":
        scales, sizes = attrs.pop("scales", [1, 1, 2, 2]), attrs.pop("sizes", None)
        inits += [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                  numpy_helper.from_array(np.array(scales if sizes is None else [], np.float32), "scales")]
        inputs = ["c", "roi", "scales"]
        if sizes is not None:
            inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
            inputs.append("sizes")
        nodes.append(helper.make_node("Resize", inputs, ["y"], name="up", **attrs))
    else:
        k = attrs.pop("k")
        inits += [numpy_helper.from_array((0.4 * rng.standard_normal((6, 4, k, k))).astype(np.float32), "wt"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(4)).astype(np.float32), "bt")]
        nodes.append(helper.make_node("ConvTranspose", ["c", "wt", "bt"], ["y"], kernel_shape=[k, k], name="up",
                                      **attrs))
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("attrs,kind", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     "RESIZE_NEAREST_NEIGHBOR"),  # torch's F.interpolate(mode="nearest"), Paddle's nearest_interp
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor"},
     "RESIZE_NEAREST_NEIGHBOR"),  # torch's "nearest-exact"
    ({"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_ceil",
      "scales": [1, 1, 3, 2]}, "RESIZE_NEAREST_NEIGHBOR"),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, "RESIZE_BILINEAR"),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel", "sizes": [1, 6, 15, 18]},
     "RESIZE_BILINEAR"),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, "RESIZE_BILINEAR"),
    ({"mode": "linear", "coordinate_transformation_mode": "asymmetric", "scales": [1, 1, 4, 4]}, "RESIZE_BILINEAR"),
])
def test_resize_lowers_to_the_tflite_op_that_computes_what_onnxruntime_does(tmp_path, attrs, kind):
    """Each ONNX coordinate mode maps to the TFLite resize with the same sampling grid: every output
    pixel equals onnxruntime's, in float and (on one int8 grid, as TFLite requires) in INT8."""
    model = _upsampler(tmp_path / "m.onnx", "Resize", **dict(attrs))
    rows = attrs["sizes"][0] if "sizes" in attrs else 8  # sizes name the batch too
    x = np.random.default_rng(1).standard_normal((rows, 3, 10, 12)).astype(np.float32)
    graph = lower(onnx.load(str(model)))
    assert [op.kind for op in graph.ops].count(kind) == 1
    write_tflite(graph, tmp_path / "float.tflite")
    want = _onnx_out(model, "x", x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0, atol=2e-5)
    write_tflite(graph, tmp_path / "int8.tflite", calibration_ranges(model, graph, {"x": x}))
    assert op_counts(tmp_path / "int8.tflite")["tensor_dtypes"]["float32"] == 2
    err = np.abs(_tflite_out(tmp_path / "int8.tflite", "x", x) - want)
    assert err.max() <= 0.03 * (want.max() - want.min()), err.max()


def test_a_resize_tflite_has_no_form_for_is_refused_by_name(tmp_path):
    model = _upsampler(tmp_path / "m.onnx", "Resize", mode="cubic")
    with pytest.raises(ConversionError, match="Resize \\(node up\\) with mode=cubic.*--format onnx"):
        lower(onnx.load(str(model)))
    model = _upsampler(tmp_path / "m.onnx", "Resize", mode="nearest", scales=[1, 1, 1.3, 1.3])
    with pytest.raises(ConversionError, match="Resize \\(node up\\) by a scale that does not give whole sizes"):
        lower(onnx.load(str(model)))


@pytest.mark.parametrize("attrs,ops,batch", [
    ({"k": 2, "strides": [2, 2]}, {"DEPTH_TO_SPACE"}, -1),                            # DBNet's, U-Net's
    ({"k": 2, "strides": [2, 2], "pads": [1, 0, 0, 1]}, {"DEPTH_TO_SPACE", "SLICE"}, -1),
    ({"k": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}, {"PAD", "DEPTH_TO_SPACE", "SLICE"}, -1),
    ({"k": 3, "strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, {"PAD", "DEPTH_TO_SPACE", "SLICE"},
     -1),
    ({"k": 5, "strides": [3, 3], "pads": [2, 1, 0, 2]}, {"PAD", "DEPTH_TO_SPACE", "SLICE"}, -1),
    ({"k": 3, "strides": [1, 1]}, {"PAD"}, -1),                                        # a plain conv, flipped
    ({"k": 4, "strides": [2, 1], "pads": [1, 1, 1, 1]}, {"TRANSPOSE_CONV"}, 1),        # TF's SAME
    ({"k": 3, "strides": [2, 1], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}, {"TRANSPOSE_CONV", "SLICE"}, 1),
])
def test_conv_transpose_lowers_to_what_onnxruntime_computes(tmp_path, attrs, ops, batch):
    """A transposed conv becomes the sub-pixel conv it equals (CONV_2D, DEPTH_TO_SPACE: int8
    kernels in XNNPACK; the batch stays free), cropped by a SLICE to ONNX's padding; only strides
    that differ between the axes take a TRANSPOSE_CONV, in a model for batches of one (its output
    shape is a constant)."""
    model = _upsampler(tmp_path / "m.onnx", "ConvTranspose", **dict(attrs))
    x = np.random.default_rng(2).standard_normal((8, 3, 10, 12)).astype(np.float32)
    graph = lower(onnx.load(str(model)))
    kinds = {op.kind for op in graph.ops}
    assert ops <= kinds and not ({"DEPTH_TO_SPACE", "TRANSPOSE_CONV"} - ops) & kinds, kinds
    assert graph.shapes["x"][0] == batch
    write_tflite(graph, tmp_path / "float.tflite")
    want = _onnx_out(model, "x", x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0, atol=2e-5)
    if batch == 1:  # the runtime refuses a larger batch rather than answer for its first row only
        with pytest.raises(InferenceError, match=r"takes shape \[1, 3, 10, 12\], not \[8, 3, 10, 12\]"):
            TfliteSession(tmp_path / "float.tflite").rt.run({"x": x})
    write_tflite(graph, tmp_path / "int8.tflite", calibration_ranges(model, graph, {"x": x}))
    assert op_counts(tmp_path / "int8.tflite")["tensor_dtypes"]["float32"] == 2
    err = np.abs(_tflite_out(tmp_path / "int8.tflite", "x", x) - want)
    assert err.max() <= 0.05 * (want.max() - want.min()), err.max()


def test_scale_and_shift_layers_fold_into_the_convs_around_them(tmp_path):
    """PP-OCR-style blocks: a conv's bias Add, BatchNormalization and learned Mul/Add fold into its
    weights; hard-swish's / 6 and the scale and shift after it become one 1x1 depthwise op (the
    shift cannot cross the next conv's zero padding); the float model still computes what ONNX does."""
    from converters.tflite_simplify import simplify

    model = zoo.build_text_detector_like(tmp_path / "det.onnx", size=32)
    ops = [n.op_type for n in onnx.load(str(model)).graph.node]
    graph = lower(onnx.load(str(model)))
    kinds = [op.kind for op in graph.ops]
    # every conv's Mul/Add pair is gone; each hard-swish keeps its ADD(relu6) and MUL
    assert kinds.count("MUL") == ops.count("Div") and kinds.count("ADD") == ops.count("Div") + 1  # + the FPN's sum
    assert "BatchNormalization" in ops and kinds.count("DEPTHWISE_CONV_2D") == 2 + ops.count("Div")
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    write_tflite(graph, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "image", x), _onnx_out(model, "image", x),
                               rtol=0, atol=1e-5)
    assert len(simplify(graph).ops) == len(graph.ops)  # nothing left to merge: it was done once


def test_a_text_detector_becomes_full_integer_tflite_and_serves(assets, tmp_path):
    """A DBNet-style detector (PP-OCR's layout) through the CLI: resizes, transposed convs as
    DEPTH_TO_SPACE, all int8 inside, its probability map close to FP32, and the agent serves it."""
    model = zoo.build_text_detector_like(tmp_path / "det.onnx", size=64)
    calib, evaluation = zoo.write_image_npz(tmp_path, size=64, n_calibration=48, n_eval=16)
    out = tmp_path / "det.ewb"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(model), "--calibration", str(calib),
                           "--eval", str(evaluation), "--format", "tflite", "--allow-worse", "--key",
                           str(assets.key), "-o", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    counts = report["graph"]
    assert counts["ops"]["DEPTH_TO_SPACE"] == 2 and "TRANSPOSE_CONV" not in counts["ops"]
    assert counts["ops"]["RESIZE_NEAREST_NEIGHBOR"] == 1 and counts["ops"]["RESIZE_BILINEAR"] == 1
    assert counts["tensor_dtypes"]["float32"] == 2
    q = report["quality"]
    assert q["max_abs_err"] <= 0.05 and q["mean_abs_err"] <= 0.01, q  # probabilities
    engine = Engine(Budget(8192, reserve_mb=0))
    loaded = engine.load(Store(tmp_path / "store").install(open_bundle(out, [load_public_key(assets.pub)])))
    assert loaded.manifest.inputs[0].shape == [-1, 3, 64, 64]
    assert loaded.manifest.selftest.min_top1_agreement == 0.0  # a map has no top class; the tolerance holds it
    assert loaded.self_test()["max_abs_err"] <= loaded.manifest.selftest.atol
    engine.activate(loaded)
    with np.load(evaluation) as d:
        x = d["image"][:5]
    got = next(iter(engine.infer_arrays("det", {"image": x})[1].values()))
    assert got.shape == (5, 1, 64, 64) and np.abs(got - _onnx_out(model, "image", x)).max() <= 0.05
    engine.close()


@pytest.mark.parametrize("consumer", ["Conv", "ConvTranspose", "Gemm"])
def test_a_scale_by_a_constant_folds_into_the_layer_it_feeds(tmp_path, consumer):
    """x * c (one value per channel) feeding a conv, a transposed conv (through a zero PAD where
    the padding is not TF's) or a fully-connected layer is folded into that layer's weights: the
    MUL is gone, and the answers stay what onnxruntime computes."""
    rng = np.random.default_rng(4)
    image = consumer != "Gemm"
    c = rng.uniform(0.5, 2.0, (1, 6, 1, 1) if image else (1, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(c, "c")]
    if consumer == "Conv":
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 6, 3, 3)).astype(np.float32), "w"))
        layer = helper.make_node("Conv", ["s", "w"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 2, 1])  # a PAD first
    elif consumer == "ConvTranspose":
        inits.append(numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "w"))
        layer = helper.make_node("ConvTranspose", ["s", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w"))
        layer = helper.make_node("Gemm", ["s", "w"], ["y"])
    shape = ["n", 6, 9, 9] if image else ["n", 6]
    graph = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["s"]), layer], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    lowered = lower(onnx.load(str(tmp_path / "m.onnx")))
    assert "MUL" not in [op.kind for op in lowered.ops], [op.kind for op in lowered.ops]
    write_tflite(lowered, tmp_path / "float.tflite")
    x = rng.standard_normal((1 if consumer == "ConvTranspose" else 4, *[d for d in shape[1:]])).astype(np.float32)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), _onnx_out(tmp_path / "m.onnx", "x", x),
                               rtol=0, atol=1e-4)


def _serve_torch_as_tflite(net, x: np.ndarray, name: str, tmp_path: Path, assets, max_share: float,
                           mean_share: float, float_tensors: int = 2):
    """A PyTorch module as an INT8 TFLite bundle (x[:48] calibrates, x[48:] evaluates), int8
    inside (but for `float_tensors`: the float input and output) and within the given shares of
    the output range, then serving x[48:58] in one
    request through the agent's engine as the module answers them: (report, manifest, the
    engine's answer, the module's)."""
    import torch

    from converters.from_torch import convert_torch

    np.savez(tmp_path / "calib.npz", input=x[:48])
    np.savez(tmp_path / "eval.npz", input=x[48:])
    out = tmp_path / f"{name}.ewb"
    report = convert_torch(net, {"input": x[:2]}, tmp_path / "calib.npz", out, assets.key, tmp_path / "eval.npz",
                           ConvertOptions(name=name, format="tflite", allow_worse=True))
    assert report["graph"]["tensor_dtypes"]["float32"] == float_tensors
    q = report["quality"]
    assert q["max_abs_err"] <= max_share * q["output_range"] and q["mean_abs_err"] <= mean_share * q["output_range"], q
    engine = Engine(Budget(8192, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(out, [load_public_key(assets.pub)])))
    engine.activate(model)
    with torch.no_grad():
        want = net(torch.from_numpy(x[48:58])).numpy()
    got = next(iter(engine.infer_arrays(name, {"input": x[48:58]})[1].values()))
    engine.close()
    assert got.shape == want.shape and np.abs(got - want).max() <= max_share * q["output_range"]
    return report, model.manifest, got, want


def test_a_pytorch_unet_becomes_full_integer_tflite_with_a_free_batch(assets, tmp_path):
    """A U-Net as torch exports it (ConvTranspose2d 2x2 and 4x4 stride 2, bilinear interpolate,
    skip concatenations, BatchNorm, Hardswish): every upsampling is a sub-pixel conv, all int8
    inside, close to FP32, and the agent takes any number of images per request."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.enc3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.Hardswish())
            self.up3 = nn.ConvTranspose2d(16, 16, 2, stride=2)
            self.dec2 = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
            self.up2 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(e1)
            d2 = self.dec2(torch.cat([self.up3(self.enc3(e2)), e2], 1))
            y = self.head(torch.cat([self.up2(d2), e1], 1))
            return torch.sigmoid(y + F.interpolate(F.avg_pool2d(y, 4), scale_factor=4, mode="bilinear"))

    torch.manual_seed(0)
    net = UNet().eval()
    report, manifest, _, _ = _serve_torch_as_tflite(net, torch.randn(64, 3, 32, 32).numpy(), "unet", tmp_path,
                                                    assets, max_share=0.1, mean_share=0.01)
    ops = report["graph"]["ops"]
    assert ops["DEPTH_TO_SPACE"] == 2 and ops["RESIZE_BILINEAR"] == 1 and "TRANSPOSE_CONV" not in ops, ops
    assert manifest.inputs[0].shape == [-1, 3, 32, 32] and manifest.outputs[0].shape == [-1, 2, 32, 32]


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_an_opset_9_upsample_keeps_its_sampling_when_the_model_is_raised_to_opset_13(tmp_path, mode):
    """Upsample (opset 9, as older exporters write a feature pyramid) samples at x / scale. onnx's
    version converter rewrote it as a Resize that samples at half-pixel centres: a bilinear
    upsampling off by half a pixel, in both formats. The raised model computes what the original
    does, and so does its TFLite form."""
    from converters.onnx_graph import upgrade_opset

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Upsample", ["c", "scales"], ["y"], mode=mode)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 20, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(tmp_path / "old.onnx"))
    raised, changed = upgrade_opset(onnx.load(str(tmp_path / "old.onnx")))
    assert changed and raised.opset_import[0].version == 13
    onnx.save(raised, str(tmp_path / "raised.onnx"))
    x = rng.standard_normal((4, 3, 10, 12)).astype(np.float32)
    want = _onnx_out(tmp_path / "old.onnx", "x", x)
    np.testing.assert_allclose(_onnx_out(tmp_path / "raised.onnx", "x", x), want, rtol=0, atol=1e-5)
    write_tflite(lower(raised), tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0, atol=1e-5)


def test_resizing_to_a_skip_connections_size_as_torch_exports_it_converts(assets, tmp_path):
    """F.interpolate(x, size=skip.shape[2:]) exports as a Resize whose sizes are computed from
    Shape nodes, the free batch among them: it lowers with the batch left free, and the INT8
    bundle answers as the module does."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from converters.from_torch import convert_torch, to_onnx

    class FPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)

        def forward(self, x):
            a = F.relu(self.a(x))
            return a + F.interpolate(F.relu(self.b(a)), size=a.shape[2:], mode="nearest")

    torch.manual_seed(0)
    net = FPN().eval()
    x = torch.randn(48, 3, 16, 16).numpy()
    path, _ = to_onnx(net, {"input": x[:2]}, tmp_path / "fpn.onnx")
    assert "Shape" in {n.op_type for n in onnx.load(str(path)).graph.node}  # the sizes are computed
    graph = lower(onnx.load(str(path)))
    assert graph.shapes["input"][0] == -1 and "RESIZE_NEAREST_NEIGHBOR" in [op.kind for op in graph.ops]
    with torch.no_grad():
        want = net(torch.from_numpy(x[32:])).numpy()
    write_tflite(graph, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "input", x[32:]), want, rtol=0, atol=1e-5)
    np.savez(tmp_path / "calib.npz", input=x[:32])
    np.savez(tmp_path / "eval.npz", input=x[32:])
    report = convert_torch(net, {"input": x[:2]}, tmp_path / "calib.npz", tmp_path / "fpn.ewb", assets.key,
                           tmp_path / "eval.npz", ConvertOptions(name="fpn", format="tflite", allow_worse=True))
    q = report["quality"]
    assert report["graph"]["tensor_dtypes"]["float32"] == 2 and q["max_abs_err"] <= 0.05 * q["output_range"], q


def _float_and_int8_answer_as_onnx(source: Path, lowered, x: np.ndarray, tmp_path: Path) -> None:
    """The lowered graph written in float answers as onnxruntime does on input "x" (to 1e-5 of the
    largest value, float32's rounding), and written in INT8, calibrated on x, within 3 % of the
    output's range, every tensor int8 inside."""
    want = _onnx_out(source, "x", x)
    write_tflite(lowered, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(want).max())))
    write_tflite(lowered, tmp_path / "int8.tflite", calibration_ranges(source, lowered, {"x": x}))
    assert op_counts(tmp_path / "int8.tflite")["tensor_dtypes"]["float32"] == 2
    err = np.abs(_tflite_out(tmp_path / "int8.tflite", "x", x) - want)
    assert err.max() <= 0.03 * (want.max() - want.min()), err.max()


@pytest.mark.parametrize("activation,slope_shape", [("LeakyRelu", None), ("PRelu", (8, 1, 1)), ("PRelu", (1,))])
def test_leaky_and_parametric_relus_lower_to_their_tflite_ops(tmp_path, activation, slope_shape):
    """LeakyRelu (YOLO's activation) and PRelu (a slope per channel, or one: face detectors')
    become LEAKY_RELU and PRELU: the float model computes what onnxruntime does, the INT8 one
    within 3 % of the range, with every tensor int8 inside."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w")]
    if activation == "LeakyRelu":
        act = helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.1)
    else:
        inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.3, slope_shape).astype(np.float32), "slope"))
        act = helper.make_node("PRelu", ["c", "slope"], ["y"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4), act]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((16, 3, 10, 12)).astype(np.float32)
    lowered = lower(onnx.load(str(tmp_path / "m.onnx")))
    # one slope for all channels (torch's nn.PReLU() default) is a LEAKY_RELU: one op XNNPACK runs in int8
    want = "PRELU" if activation == "PRelu" and slope_shape != (1,) else "LEAKY_RELU"
    assert want in [op.kind for op in lowered.ops]
    _float_and_int8_answer_as_onnx(tmp_path / "m.onnx", lowered, x, tmp_path)


def _cut_model(case: str):
    """A conv of 8 channels on [n, 3, 10, 12], then `case`'s Split or Slice, then what joins the parts."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4)]
    opset = 13
    i64 = lambda name, v: inits.append(numpy_helper.from_array(np.array(v, np.int64), name))  # noqa: E731
    if case == "split-input":
        i64("sizes", [3, 5])
        nodes += [helper.make_node("Split", ["c", "sizes"], ["p0", "p1"], axis=1),
                  helper.make_node("Relu", ["p1"], ["r1"]),
                  helper.make_node("Concat", ["r1", "p0"], ["y"], axis=1)]
    elif case == "split-attribute":
        opset = 11
        nodes += [helper.make_node("Split", ["c"], ["p0", "p1"], axis=-3, split=[2, 6]),
                  helper.make_node("Sigmoid", ["p0"], ["s0"]),
                  helper.make_node("Concat", ["p1", "s0"], ["y"], axis=1)]
    elif case == "split-equal-parts":
        opset = 18
        nodes += [helper.make_node("Split", ["c"], ["p0", "p1", "p2"], axis=1, num_outputs=3),  # 3, 3, 2
                  helper.make_node("Concat", ["p2", "p0", "p1"], ["y"], axis=1)]
    elif case == "slice-channels":
        i64("starts", [2]), i64("ends", [-1]), i64("axes", [1])
        nodes += [helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["y"])]
    elif case == "slice-crop":
        i64("starts", [1, -10]), i64("ends", [9, 2**62]), i64("axes", [2, 3]), i64("steps", [1, 1])
        nodes += [helper.make_node("Slice", ["c", "starts", "ends", "axes", "steps"], ["y"])]
    elif case == "slice-flat":
        inits.append(numpy_helper.from_array((rng.standard_normal((8 * 10 * 12, 16)) * 0.05).astype(np.float32), "fc"))
        i64("starts", [4]), i64("ends", [12]), i64("axes", [-1])
        nodes += [helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["m"]),
                  helper.make_node("Slice", ["m", "starts", "ends", "axes"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case,slices", [("split-input", 2), ("split-attribute", 2), ("split-equal-parts", 3),
                                         ("slice-channels", 1), ("slice-crop", 1), ("slice-flat", 1)])
def test_split_and_slice_become_slices_at_the_inputs_scale(tmp_path, case, slices):
    """Split (sizes as an input, as an attribute, or equal parts) and Slice (channels, a crop of
    height and width with negative and past-the-end bounds, a flat tensor's features): one
    SLICE per part. The float model computes what onnxruntime does, the INT8 one within 3 % of
    the range with every tensor int8 inside, and the batch stays free."""
    onnx.save(_cut_model(case), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(8).standard_normal((16, 3, 10, 12)).astype(np.float32)
    lowered = lower(onnx.load(str(tmp_path / "m.onnx")))
    assert [op.kind for op in lowered.ops].count("SLICE") == slices and lowered.shapes["x"][0] == -1
    _float_and_int8_answer_as_onnx(tmp_path / "m.onnx", lowered, x, tmp_path)


@pytest.mark.parametrize("starts,ends,axes,steps,why", [
    ([0], [1], [0], [1], "along the batch axis"),
    ([0], [8], [1], [2], "with steps \\[2\\]"),
    ([5], [2], [1], [1], "that selects nothing"),
])
def test_slices_it_cannot_map_are_refused_by_name(tmp_path, starts, ends, axes, steps, why):
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w")]
    for name, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
        inits.append(numpy_helper.from_array(np.array(v, np.int64), name))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Slice", ["c", "starts", "ends", "axes", "steps"], ["y"], name="cut")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(ConversionError, match=f"Slice \\(node cut\\) {why} has no TFLite mapping"):
        lower(model)


def test_a_yolov8_style_backbone_and_neck_from_pytorch_becomes_full_integer_tflite(assets, tmp_path):
    """The layers of a YOLOv8 up to its detection outputs, as torch exports them: conv, batch
    norm and SiLU (x * sigmoid(x)); C2f blocks, whose x.chunk(2, 1) exports as Slices with bounds
    computed from Shape; residual adds; SPPF (three 5x5 max pools, stride 1, concatenated);
    nearest upsampling and a skip concatenation; box and class convs. Int8 inside, close to
    FP32, and the agent answers a request of ten images as the module does."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    def conv(ci, co, k=3, s=1):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = conv(c, c), conv(c, c)

        def forward(self, x):
            return x + self.b(self.a(x))

    class C2f(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.cv1, self.cv2, self.m = conv(ci, co, 1), conv(3 * (co // 2), co, 1), Bottleneck(co // 2)

        def forward(self, x):
            a, b = self.cv1(x).chunk(2, 1)
            return self.cv2(torch.cat([a, b, self.m(b)], 1))

    class SPPF(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2, self.pool = conv(c, c // 2, 1), conv(2 * c, c, 1), nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.pool(x)
            y2 = self.pool(y1)
            return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))

    class TinyYolo(nn.Module):
        def __init__(self):
            super().__init__()
            self.p3 = nn.Sequential(conv(3, 8, 3, 2), conv(8, 16, 3, 2), C2f(16, 16))
            self.p4 = nn.Sequential(conv(16, 32, 3, 2), C2f(32, 32), SPPF(32))
            self.neck = C2f(48, 16)
            self.box, self.cls = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 3, 1)

        def forward(self, x):
            p3 = self.p3(x)
            f = self.neck(torch.cat([F.interpolate(self.p4(p3), scale_factor=2.0, mode="nearest"), p3], 1))
            return torch.cat([self.box(f), self.cls(f).sigmoid()], 1)

    torch.manual_seed(0)
    net = TinyYolo().eval()
    report, manifest, _, _ = _serve_torch_as_tflite(net, torch.randn(64, 3, 64, 64).numpy(), "yolo", tmp_path,
                                                    assets, max_share=0.02, mean_share=0.005)
    ops = report["graph"]["ops"]
    # the batch is free, so each slice runs to its end: STRIDED_SLICE with that axis masked, which
    # XNNPACK takes (a SLICE of size -1 it does not)
    assert ops["STRIDED_SLICE"] == 6 and "SLICE" not in ops and ops["MAX_POOL_2D"] == 3 and ops["LOGISTIC"] == 18, ops
    # and the model is two XNNPACK parts, split only by the neck's nearest 2x upsampling, which XNNPACK
    # runs in float only (as SLICEs of size -1, each C2f block's split cut it once more)
    assert xnnpack_partitions(_member(tmp_path / "yolo.ewb", "model.tflite", tmp_path / "yolo.tflite")) == 2
    assert manifest.outputs[0].shape == [-1, 19, 16, 16]


def test_a_yolov8_detect_head_with_its_box_decoding_becomes_full_integer_tflite(assets, tmp_path):
    """YOLOv8's Detect head as ultralytics writes it, decoding included: each scale's box and class
    maps concatenated and reshaped to [N, C, H*W], joined along the anchors, split into the box
    distributions and class logits, the DFL (a reshape to [N, 4, 16, A], a transpose, a softmax over
    the bins, a 1x1 conv of weights 0..15), the anchor grid and strides, and [boxes, scores] out.
    The float TFLite computes what the module does; in INT8 the boxes stay within a pixel or two,
    and the scores, joined to the boxes in float (one int8 scale for pixels and probabilities
    would zero them), within a step of their own."""
    import torch

    from yolokit import decoded_yolo

    from converters.from_torch import to_onnx

    net = decoded_yolo()
    x = torch.rand(64, 3, 32, 32).numpy()
    path, _ = to_onnx(net, {"input": x[:2]}, tmp_path / "decoded.onnx")
    write_tflite(lower(onnx.load(str(path))), tmp_path / "float.tflite")
    with torch.no_grad():
        np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "input", x[48:]),
                                   net(torch.from_numpy(x[48:])).numpy(), rtol=0, atol=1e-4)
    report, manifest, got, want = _serve_torch_as_tflite(net, x, "decoded", tmp_path, assets, max_share=0.03,
                                                         mean_share=0.005, float_tensors=4)  # + boxes, scores
    ops = report["graph"]["ops"]
    assert ops["SOFTMAX"] == 1 and ops["RESHAPE"] >= 3 and ops["DEQUANTIZE"] == 2, ops  # the last concat in float
    assert manifest.outputs[0].shape == [-1, 7, 80]
    assert np.abs(got[:, :4] - want[:, :4]).max() <= 2.0  # pixels, in a 32x32 image
    assert np.abs(got[:, 4:] - want[:, 4:]).max() <= 1.5 / 256  # probabilities


def _detector_with_decoding(path: Path) -> Path:
    """Two conv heads (boxes, scores) on a shared stem, then a decoding that ends in a selection
    TFLite's builtins lack: each map reshaped to [N, C, H*W], the boxes scaled by a second
    input (which feeds only the decoding), the 5 best scores picked by TopK."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.4).astype(np.float32), "wb"),
             numpy_helper.from_array((rng.standard_normal((2, 8, 1, 1)) * 0.4).astype(np.float32), "ws"),
             numpy_helper.from_array(np.array([0, 4, -1], np.int64), "flat4"),
             numpy_helper.from_array(np.array([0, 2, -1], np.int64), "flat2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["stem"]),
             helper.make_node("Conv", ["stem", "wb"], ["boxes"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["stem", "ws"], ["s"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["s"], ["scores"]),
             helper.make_node("Reshape", ["boxes", "flat4"], ["boxes_flat"]),
             helper.make_node("Mul", ["boxes_flat", "stride"], ["boxes_px"]),
             helper.make_node("Reshape", ["scores", "flat2"], ["scores_flat"]),
             helper.make_node("TopK", ["scores_flat", "k"], ["best", "best_at"], axis=2)]
    inits.append(numpy_helper.from_array(np.array([5], np.int64), "k"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16]),
                                           helper.make_tensor_value_info("stride", TensorProto.FLOAT, ["n", 1, 1])],
                              [helper.make_tensor_value_info("boxes_px", TensorProto.FLOAT, ["n", 4, 256]),
                               helper.make_tensor_value_info("best", TensorProto.FLOAT, ["n", 2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_cut_at_ends_the_model_before_a_decoding_tflite_cannot_map(assets, tmp_path):
    """A detector whose decoding ends in a TopK is refused for TFLite, naming the tensor to
    --cut-at. Cut at the heads' outputs, it converts: the bundle's outputs are those maps, the
    input the decoding alone used is gone, and the agent answers what the FP32 heads compute."""
    source = _detector_with_decoding(tmp_path / "det.onnx")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((48, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:32], stride=np.ones((32, 1, 1), np.float32))
    with pytest.raises(ConversionError, match="TopK .* has no TFLite mapping .*--cut-at scores_flat,"):
        convert_onnx(source, tmp_path / "calib.npz", tmp_path / "whole.ewb", assets.key,
                     options=ConvertOptions(name="det", format="tflite", allow_worse=True))
    assert not (tmp_path / "whole.ewb").exists()
    np.savez(tmp_path / "calib-x.npz", x=x[:32])
    np.savez(tmp_path / "eval-x.npz", x=x[32:])
    out = tmp_path / "heads.ewb"
    report = convert_onnx(source, tmp_path / "calib-x.npz", out, assets.key, tmp_path / "eval-x.npz",
                          ConvertOptions(name="det", format="tflite", allow_worse=True, cut_at=["scores", "boxes"]))
    assert report["graph"]["tensor_dtypes"]["float32"] == 3  # the image in, two maps out
    bundle = open_bundle(out, [load_public_key(assets.pub)])
    assert [s.name for s in bundle.manifest.inputs] == ["x"]
    assert [(s.name, s.shape) for s in bundle.manifest.outputs] == [("scores", [-1, 2, 16, 16]),
                                                                    ("boxes", [-1, 4, 16, 16])]
    with np.load(_member(out, "reference.npz", tmp_path / "reference.npz")) as ref:  # one tolerance: the widest's
        spans = {n: float(ref[f"expected.{n}"].max() - ref[f"expected.{n}"].min()) for n in ("boxes", "scores")}
    assert spans["boxes"] > 2 * spans["scores"]
    assert bundle.manifest.selftest.atol == pytest.approx(0.05 * spans["boxes"], rel=1e-4)
    engine = Engine(Budget(8192, reserve_mb=0))
    engine.activate(engine.load(Store(tmp_path / "store").install(bundle)))
    got = engine.infer_arrays("det", {"x": x[32:42]})[1]
    whole = onnx.load(str(source))  # the heads' FP32 values: the whole model, with them as outputs too
    whole.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("boxes", "scores"))
    heads = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["boxes", "scores"], {"x": x[32:42], "stride": np.ones((10, 1, 1), np.float32)})
    for name, want in zip(("boxes", "scores"), heads):
        err, span = np.abs(got[name] - want), want.max() - want.min()
        assert err.max() <= 0.05 * span and err.mean() <= 0.01 * span, (name, err.max(), err.mean(), span)
    engine.close()


def test_cut_at_a_tensor_the_model_lacks_is_one_line_naming_the_near_ones(tmp_path):
    source = _detector_with_decoding(tmp_path / "det.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((16, 3, 16, 16), np.float32))
    out = tmp_path / "out.ewb"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "convert", str(source), "--calibration",
                        str(tmp_path / "calib.npz"), "-o", str(out), "--format", "tflite", "--cut-at", "boxs"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--cut-at boxs: the model has no tensor 'boxs'" in lines[0] and "such as boxes" in lines[0]
    assert not out.exists()


def test_a_bias_behind_an_input_calibration_saw_as_zero_stays_exact(dead_relu_onnx, tmp_path):
    """A conv whose input is dead on all the calibration data (a ReLU of negatives) gets the
    narrowest input scale; its bias of 2.0 then needed ~5e11 int32 steps, was clipped, and the
    INT8 layer put out ~0.01 where FP32 puts out its bias. Its weight scales widen so the bias
    fits (and the dead layer's output range so that XNNPACK takes the model), and the answers
    stay exact."""
    from conftest import DEAD_RELU_BIAS

    source, x = dead_relu_onnx
    lowered = lower(onnx.load(str(source)))
    write_tflite(lowered, tmp_path / "int8.tflite", calibration_ranges(source, lowered, {"x": x[:32]}))
    got = _tflite_out(tmp_path / "int8.tflite", "x", x[32:])
    np.testing.assert_allclose(got, np.broadcast_to(DEAD_RELU_BIAS[None, :, None, None], got.shape), rtol=0, atol=0.02)


def test_quality_is_that_of_the_output_that_lost_most():
    """Of a detector's outputs, the one that broke is reported, not the first (each output's own
    self-test tolerance: tests/test_store_engine.py)."""
    from converters.measure import compare

    rng = np.random.default_rng(14)
    boxes, scores = rng.random((8, 4)) * 640, rng.random((8, 3))
    q = compare({"boxes": boxes, "scores": scores}, {"boxes": boxes + 0.5, "scores": scores + 0.2})
    assert q["worst_output"] == "scores" and q["max_abs_err"] == pytest.approx(0.2)
    assert q["output_range"] == pytest.approx(scores.max() - scores.min(), abs=1e-5)
    q = compare({"boxes": boxes, "scores": scores}, {"boxes": boxes + 50, "scores": scores})
    assert q["worst_output"] == "boxes" and q["max_abs_err"] == pytest.approx(50)
    assert "worst_output" not in compare({"scores": scores}, {"scores": scores})


@pytest.mark.parametrize("case", ["transpose-map", "softmax-over-channels", "softmax-over-width", "flatten-map-out",
                                  "reshape-map-to-3d"])
def test_a_feature_map_read_in_onnx_layout_lowers_through_transposes(tmp_path, case):
    """Layers that read a feature map's axes as ONNX numbers them (NCHW) get it transposed back from
    NHWC once: Transpose, a Softmax over an axis that is not the channels, a Flatten whose features
    feed no Gemm, a Reshape to [N, C, H*W]. A Softmax over the channels runs on NHWC as it is. The
    float model answers as onnxruntime does, the INT8 one within 3 % with every tensor int8."""
    rng = np.random.default_rng(15)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4)]
    if case == "transpose-map":
        nodes.append(helper.make_node("Transpose", ["c"], ["y"], perm=[0, 3, 2, 1]))
    elif case == "softmax-over-channels":
        nodes.append(helper.make_node("Softmax", ["c"], ["y"], axis=1))
    elif case == "softmax-over-width":
        nodes.append(helper.make_node("Softmax", ["c"], ["y"], axis=3))
    elif case == "flatten-map-out":
        nodes.append(helper.make_node("Flatten", ["c"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(np.array([0, 8, -1], np.int64), "shape"))
        nodes += [helper.make_node("Reshape", ["c", "shape"], ["r"]),
                  helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1])]
    lowered = lower(onnx.load(str(_onnx_file(tmp_path, nodes, inits, ["n", 3, 10, 12], opset=13))))
    kinds = [op.kind for op in lowered.ops]
    # the input's to NHWC, then one to ONNX's layout (or, for a map out, the output's back to NCHW)
    assert kinds.count("TRANSPOSE") == (3 if case == "reshape-map-to-3d" else 2), kinds
    _float_and_int8_answer_as_onnx(tmp_path / "m.onnx", lowered,
                                   rng.standard_normal((16, 3, 10, 12)).astype(np.float32), tmp_path)


@pytest.mark.parametrize("axis", [2, 0])
def test_a_constant_made_from_a_shape_is_used_where_it_does_not_depend_on_the_free_batch(tmp_path, axis):
    """A model exported with dynamic axes computes its anchor grid from its maps' shapes (Shape,
    Gather, Range, ...). With height and width fixed, such a constant is what it is whatever the
    batch, and lowers as a constant; one that changes with the batch (here: scaling by the
    batch size) is refused by name, as the batch is free."""
    rng = np.random.default_rng(16)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(axis, np.int64), "axis_index")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Shape", ["c"], ["shape"]),
             helper.make_node("Gather", ["shape", "axis_index"], ["dim"]),
             helper.make_node("Cast", ["dim"], ["dim_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["c", "dim_f"], ["y"], name="scale_by_dim")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    if axis == 0:
        with pytest.raises(ConversionError, match="Mul \\(node scale_by_dim\\) computed from a tensor's shape"):
            lower(model)
        return
    lowered = lower(onnx.load(str(tmp_path / "m.onnx")))
    assert lowered.shapes["x"][0] == -1
    _float_and_int8_answer_as_onnx(tmp_path / "m.onnx", lowered,
                                   rng.standard_normal((16, 3, 8, 10)).astype(np.float32), tmp_path)


def test_a_small_transformer_becomes_int8_tflite_with_its_layer_norms_in_float(tmp_path):
    """A transformer as torch exports it (LayerNormalization, attention as MatMuls of two activations,
    GELU as Erf, a mean over the tokens): the float .tflite computes what onnxruntime does; the INT8
    one runs attention, the projections and GELU in int8 and only the LayerNorms in float, and loses
    at most half a point of accuracy on the digits."""
    fp32_accuracy = zoo.build_digits_transformer(tmp_path / "t.onnx", epochs=8)
    assert fp32_accuracy >= 0.9
    calib, evaluation = zoo.write_digits_npz(tmp_path)
    report = convert_onnx(tmp_path / "t.onnx", calib, tmp_path / "t.ewb", None, evaluation,
                          ConvertOptions(name="t", format="tflite", allow_worse=True))
    model = _member(tmp_path / "t.ewb", "model.tflite", tmp_path / "t.tflite")
    with np.load(evaluation) as d:
        x, y = d["input"], d["labels"]
    write_tflite(lower(onnx.load(str(tmp_path / "t.onnx"))), tmp_path / "float.tflite")
    want = _onnx_out(tmp_path / "t.onnx", "input", x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "input", x), want, rtol=0, atol=1e-4)
    dtypes = op_dtypes(model)
    ops = op_counts(model)["ops"]
    assert ops["BATCH_MATMUL"] == 2 and ops["GELU"] == 1 and ops["FULLY_CONNECTED"] == 8 and ops["RSQRT"] == 3
    for kind in ("BATCH_MATMUL", "GELU", "FULLY_CONNECTED", "SOFTMAX"):
        assert dtypes[kind] == {"int8"}, (kind, dtypes[kind])
    assert dtypes["RSQRT"] == {"float32"} and dtypes["MEAN"] == {"float32", "int8"}  # the token mean: int8
    assert ops["DEQUANTIZE"] == 4 and ops["QUANTIZE"] == 4  # one pair per LayerNorm, and the model's I/O
    got = _tflite_out(model, "input", x)
    drop_pp = 100 * ((want.argmax(1) == y).mean() - (got.argmax(1) == y).mean())
    assert drop_pp <= 0.5, drop_pp
    assert report["quality"]["accuracy_drop_pp"] == pytest.approx(drop_pp, abs=0.01)
    with tarfile.open(tmp_path / "t.ewb") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest["producer"].endswith("INT8 with its 3 LayerNorm layer(s) in float)")


def _onnx_file(tmp_path: Path, nodes, inits, x_shape: list, opset: int = 17) -> Path:
    """m.onnx: the nodes between input "x" of `x_shape` and output "y"."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    onnx.save(model, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def _tokens_model(tmp_path: Path, nodes, inits, tokens: int = 6, width: int = 16, opset: int = 17) -> Path:
    return _onnx_file(tmp_path, nodes, inits, ["n", tokens, width], opset)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_normalization_lowers_to_float_ops_that_compute_what_onnxruntime_does(tmp_path, bias):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "gamma")]
    ln_inputs = ["h", "gamma"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta"))
        ln_inputs.append("beta")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("LayerNormalization", ln_inputs, ["n"], axis=-1, epsilon=1e-3, name="ln"),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    source = _tokens_model(tmp_path, nodes, inits)
    x = (rng.standard_normal((32, 6, 16)) * rng.uniform(0.5, 3, (32, 6, 1))).astype(np.float32)
    lowered = lower(onnx.load(str(source)))
    assert lowered.float_layers == {"ln"}
    want = _onnx_out(source, "x", x)
    write_tflite(lowered, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0,
                               atol=1e-5 * float(np.abs(want).max()))
    write_tflite(lowered, tmp_path / "int8.tflite", calibration_ranges(source, lowered, {"x": x}))
    dtypes = op_dtypes(tmp_path / "int8.tflite")
    assert dtypes["FULLY_CONNECTED"] == {"int8"} and dtypes["RSQRT"] == {"float32"} and dtypes["MEAN"] == {"float32"}
    err = np.abs(_tflite_out(tmp_path / "int8.tflite", "x", x) - want)
    assert err.max() <= 0.03 * (want.max() - want.min()), err.max()


def _gelu_nodes(form: str):
    """GELU as exporters write it: torch's Erf chain, with x * 0.5 last or first, or opset 20's op."""
    consts = {"root2": np.array(np.sqrt(2), np.float32), "inv_root2": np.array(1 / np.sqrt(2), np.float32),
              "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32), "two": np.array(2.0, np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    if form == "op":
        return [helper.make_node("Gelu", ["h"], ["y"], name="gelu")], inits
    scale = {"torch": helper.make_node("Div", ["h", "root2"], ["s"]),
             "half-first": helper.make_node("Mul", ["h", "inv_root2"], ["s"]),
             "not-gelu": helper.make_node("Div", ["h", "two"], ["s"])}[form]
    tail = [helper.make_node("Mul", ["h", "e1"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    if form == "half-first":
        tail = [helper.make_node("Mul", ["e1", "half"], ["m"]), helper.make_node("Mul", ["h", "m"], ["y"])]
    return [scale, helper.make_node("Erf", ["s"], ["e"], name="erf"), helper.make_node("Add", ["e", "one"], ["e1"])] \
        + tail, inits


@pytest.mark.parametrize("form", ["torch", "half-first", "op"])
def test_gelu_as_exporters_write_it_becomes_one_int8_gelu_op(tmp_path, form):
    rng = np.random.default_rng(4)
    nodes, inits = _gelu_nodes(form)
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"))
    source = _tokens_model(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["h"])] + nodes, inits,
                           opset=20 if form == "op" else 17)
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops] == ["FULLY_CONNECTED", "GELU"]
    x = rng.standard_normal((32, 6, 16)).astype(np.float32)
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)


def test_an_erf_that_is_not_part_of_a_gelu_is_refused_by_name(tmp_path):
    nodes, inits = _gelu_nodes("not-gelu")
    inits.append(numpy_helper.from_array(np.eye(16, dtype=np.float32), "w"))
    source = _tokens_model(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["h"])] + nodes, inits)
    with pytest.raises(ConversionError, match="ONNX operator Erf .*--cut-at s"):
        lower(onnx.load(str(source)))


def _ppocr_style_encoder(path: Path) -> Path:
    """A recogniser's encoder as Paddle2ONNX writes PP-OCRv4's (opset 12): a conv map squeezed to a
    sequence, LayerNorm in parts (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add), qkv
    reshaped to [N, T, 3, heads, d] and permuted [2, 0, 3, 1, 4] to take q, k, v by Slice and Squeeze
    or Gather, and a Softmax of opset 12 (which onnx's version converter rewrites with a Flatten)."""
    rng = np.random.default_rng(8)
    w = lambda *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32))  # noqa: E731
    inits = []

    def init(name, arr):
        arr.name = name
        inits.append(arr)
        return name

    def const(name, values, dtype=np.int64):
        return init(name, numpy_helper.from_array(np.array(values, dtype)))

    nodes = [
        helper.make_node("Conv", ["x", init("cw", w(16, 3, 4, 1))], ["c"], kernel_shape=[4, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Squeeze", ["r"], ["sq"], axes=[2]),
        helper.make_node("Transpose", ["sq"], ["t"], perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["t"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["t", "mean"], ["d"]),
        helper.make_node("Pow", ["d", const("two", 2.0, np.float32)], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", const("eps", 1e-5, np.float32)], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", init("gamma", numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32)))], ["scaled"]),
        helper.make_node("Add", ["scaled", init("beta", w(16))], ["ln"]),
        helper.make_node("MatMul", ["ln", init("wqkv", w(16, 48))], ["qkv0"]),
        helper.make_node("Add", ["qkv0", init("bqkv", w(48))], ["qkv1"]),
        helper.make_node("Reshape", ["qkv1", const("qkv_shape", [0, 8, 3, 2, 8])], ["qkv2"]),
        helper.make_node("Transpose", ["qkv2"], ["qkv"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Slice", ["qkv", const("s0", [0]), const("e0", [1]), const("a0", [0])], ["q5"]),
        helper.make_node("Squeeze", ["q5"], ["q"], axes=[0]),
        helper.make_node("Slice", ["qkv", const("s1", [1]), const("e1", [2]), const("a1", [0])], ["k5"]),
        helper.make_node("Squeeze", ["k5"], ["k"], axes=[0]),
        helper.make_node("Gather", ["qkv", const("i2", 2)], ["v"], axis=0),
        helper.make_node("Mul", ["q", const("dk", 0.35, np.float32)], ["qs"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "v"], ["mixed"]),
        helper.make_node("Transpose", ["mixed"], ["mixed_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["mixed_t", const("out_shape", [0, 8, 16])], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_a_ppocr_style_encoder_of_opset_12_converts_to_int8_tflite(tmp_path):
    source = _ppocr_style_encoder(tmp_path / "m.onnx")
    x = np.random.default_rng(9).standard_normal((48, 3, 4, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    report = convert_onnx(source, tmp_path / "calib.npz", tmp_path / "m.ewb", None, None,
                          ConvertOptions(name="m", format="tflite", allow_worse=True))
    model = _member(tmp_path / "m.ewb", "model.tflite", tmp_path / "m.tflite")
    from converters.onnx_graph import upgrade_opset

    lowered = lower(upgrade_opset(onnx.load(str(source)))[0])
    kinds = [op.kind for op in lowered.ops]
    assert lowered.float_layers and kinds.count("RSQRT") == 1 and kinds.count("BATCH_MATMUL") == 2
    assert kinds.count("SOFTMAX") == 1 and "Flatten" not in str(kinds)
    write_tflite(lowered, tmp_path / "float.tflite")
    want = _onnx_out(source, "x", x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0, atol=1e-5)
    dtypes = op_dtypes(model)
    assert dtypes["BATCH_MATMUL"] == dtypes["SOFTMAX"] == dtypes["FULLY_CONNECTED"] == {"int8"}
    assert dtypes["RSQRT"] == {"float32"}
    err = np.abs(_tflite_out(model, "x", x) - want)
    assert err.max() <= 0.05 * (want.max() - want.min()), err.max()
    assert report["quality"]["max_abs_err"] == pytest.approx(err.max(), rel=0.05, abs=1e-3)


def test_a_float_layer_norms_output_reshaped_into_a_conv_is_quantized_on_its_own_range(tmp_path):
    """The NHWC copy a conv needs of a LayerNorm's (float) output has no tensor in the ONNX model to
    calibrate: it takes the range of the tensor it was transposed from."""
    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
             numpy_helper.from_array(np.array([0, 6, 4, 4], np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((8, 6, 1, 1)) * 0.5).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["n"], axis=-1, name="ln"),
             helper.make_node("Reshape", ["n", "shape"], ["map"]),
             helper.make_node("Conv", ["map", "w"], ["y"], kernel_shape=[1, 1])]
    source = _tokens_model(tmp_path, nodes, inits)
    x = rng.standard_normal((32, 6, 16)).astype(np.float32)
    lowered = lower(onnx.load(str(source)))
    ranges = calibration_ranges(source, lowered, {"x": x})
    assert ranges["map/as_nhwc"] == ranges["map"]
    write_tflite(lowered, tmp_path / "int8.tflite", ranges)
    assert op_dtypes(tmp_path / "int8.tflite")["CONV_2D"] == {"int8"}
    want = _onnx_out(source, "x", x)
    err = np.abs(_tflite_out(tmp_path / "int8.tflite", "x", x) - want)
    assert err.max() <= 0.03 * (want.max() - want.min()), err.max()


@pytest.mark.parametrize("join", ["Concat", "Add"])
def test_a_feature_map_joined_with_a_tensor_in_onnx_layout_is_joined_in_onnx_layout(tmp_path, join):
    """A conv's map (NHWC inside) beside a tensor a Reshape made (as ONNX lays it out): the map is
    transposed back once and the two are joined as ONNX numbers their axes."""
    rng = np.random.default_rng(16)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0, 8, 4, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array([0, 8, 8, 8], np.int64), "back")]
    joined = helper.make_node("Concat", ["a", "b"], ["y"], axis=1) if join == "Concat" else \
        helper.make_node("Add", ["a", "b"], ["y"])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["x", "w2"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Reshape", ["c", "shape"], ["r"]), helper.make_node("Reshape", ["r", "back"], ["b"]),
             joined]
    lowered = lower(onnx.load(str(_onnx_file(tmp_path, nodes, inits, ["n", 3, 8, 8]))))
    assert {"Concat": "CONCATENATION", "Add": "ADD"}[join] in [op.kind for op in lowered.ops]
    _float_and_int8_answer_as_onnx(tmp_path / "m.onnx", lowered, rng.standard_normal((16, 3, 8, 8)).astype(np.float32),
                                   tmp_path)


def _wake_word_style(tmp_path: Path, pad_mode: str = "constant", max_of_two: bool = False) -> Path:
    """The layers openWakeWord's speech embedding holds as tf2onnx writes it: zeros padded around one
    axis (Pad), a batch norm after a ReLU (no conv before it to fold into), LeakyRelu, and a clamp
    from below as Max(x, -0.4)."""
    rng = np.random.default_rng(19)
    c = 6
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 1, 0], np.int64), "pads"),
             numpy_helper.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.2, "beta"),
             numpy_helper.from_array(rng.uniform(0, 0.5, c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
             numpy_helper.from_array(np.array(-0.4, np.float32), "floor")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode=pad_mode),
             helper.make_node("Conv", ["p", "w1"], ["c1"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("BatchNormalization", ["r1", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("LeakyRelu", ["bn"], ["lr"], alpha=0.2),
             helper.make_node("Max", ["lr", "lr" if max_of_two else "floor"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    return _onnx_file(tmp_path, nodes, inits, ["n", 3, 10, 12], opset=13)


def test_a_wake_word_embeddings_pad_batch_norm_and_clamp_lower_to_int8_ops(tmp_path):
    """Pad becomes PAD (in the map's NHWC axes), the batch norm one 1x1 DEPTHWISE_CONV_2D, Max(x, c)
    an ADD with a fused RELU and an ADD: the float model answers as onnxruntime does, the INT8 one
    within 3 % of its range, every tensor int8."""
    source = _wake_word_style(tmp_path)
    lowered = lower(onnx.load(str(source)))
    kinds = [op.kind for op in lowered.ops]
    assert kinds.count("PAD") == 1 and kinds.count("DEPTHWISE_CONV_2D") == 1 and kinds.count("ADD") == 2
    x = np.random.default_rng(20).standard_normal((16, 3, 10, 12)).astype(np.float32)
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)


def test_a_reflection_pad_is_a_mirror_pad_in_both_precisions(tmp_path):
    """Pad in reflect mode (an STFT's centring, a vocoder's convs) is TFLite's MIRROR_PAD, at its
    input's int8 scale: the float and INT8 models answer as onnxruntime does."""
    source = _wake_word_style(tmp_path, pad_mode="reflect")
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops].count("MIRROR_PAD") == 1
    x = np.random.default_rng(21).standard_normal((16, 3, 10, 12)).astype(np.float32)
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)


@pytest.mark.parametrize("case,why", [("edge", "of mode edge"), ("max-of-two", "other than of a tensor and one")])
def test_pads_and_maxima_it_cannot_map_are_refused_by_name(tmp_path, case, why):
    source = _wake_word_style(tmp_path, pad_mode="edge" if case == "edge" else "constant",
                              max_of_two=case == "max-of-two")
    with pytest.raises(ConversionError, match=f"ONNX operator (Pad|Max) .*{why}"):
        lower(onnx.load(str(source)))


def test_a_relu_after_a_concat_stays_its_own_op(tmp_path):
    """TFLite's CONCATENATION kernels ignore a fused activation: a Relu fused into one was lost in
    the float model (negatives through) and held only by the int8 output range. It stays a RELU
    (written in int8 as a MUL with the RELU fused), and both models answer as onnxruntime does."""
    rng = np.random.default_rng(23)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((5, 7, 1, 1)) * 0.5).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Concat", ["c", "x"], ["cat"], axis=1), helper.make_node("Relu", ["cat"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    source = _onnx_file(tmp_path, nodes, inits, ["n", 3, 6, 6])
    lowered = lower(onnx.load(str(source)))
    concat = next(op for op in lowered.ops if op.kind == "CONCATENATION")
    assert concat.options["activation"] == "NONE" and "RELU" in [op.kind for op in lowered.ops]
    _float_and_int8_answer_as_onnx(source, lowered, rng.standard_normal((16, 3, 6, 6)).astype(np.float32), tmp_path)
    assert "RELU" not in op_counts(tmp_path / "int8.tflite")["ops"]


# ------------------------------------------------------------------ 1-D conv models (PyTorch's Conv1d)

def _conv1d_net(transpose_in_the_middle: bool = False):
    """A keyword-spotting or sensor classifier as PyTorch users build one on [N, C, T]: Conv1d with
    BatchNorm1d and ReLU, MaxPool1d, a dilated Conv1d, a depthwise one (groups) with a PReLU
    slope per channel, AvgPool1d, a channel scale, the mean over time and a Linear."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv1d(3, 16, 5, padding=2), nn.BatchNorm1d(16)
            self.c2 = nn.Conv1d(16, 32, 3, padding=2, dilation=2)
            self.dw, self.act = nn.Conv1d(32, 32, 3, padding=1, groups=32), nn.PReLU(32)
            self.scale = nn.Parameter(torch.rand(32, 1) + 0.5)
            self.pool, self.avg, self.fc = nn.MaxPool1d(2), nn.AvgPool1d(2), nn.Linear(32, 4)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn(self.c1(x))))
            x = torch.relu(self.c2(x))
            if transpose_in_the_middle:  # [N, T, C]: a layer this lift does not take
                x = x.transpose(1, 2).relu().transpose(1, 2)
            x = self.avg(self.act(self.dw(x))) * self.scale
            return self.fc(x.mean(-1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


def test_a_pytorch_conv1d_model_lowers_as_the_2d_model_it_equals(assets, tmp_path):
    """PyTorch's Conv1d stacks (audio, vibration and sensor classifiers) are lifted to the 2-D
    model they equal, [N, C, T] as [N, C, 1, T], the input staying [N, C, T]: the float TFLite
    computes what onnxruntime does, the INT8 one within 3 % of the output's range, its batch free,
    in one XNNPACK part; converted from the module, the agent serves it as the module answers."""
    from converters.from_torch import to_onnx

    x = np.random.default_rng(30).standard_normal((32, 3, 64)).astype(np.float32)
    source, _ = to_onnx(_conv1d_net(), {"x": x[:2]}, tmp_path / "c1d.onnx")
    assert {"Conv", "MaxPool", "AveragePool", "PRelu", "ReduceMean"} <= {n.op_type for n in onnx.load(str(source)).graph.node}
    lowered = lower(onnx.load(str(source)))
    kinds = [op.kind for op in lowered.ops]
    assert kinds.count("CONV_2D") == 2 and kinds.count("DEPTHWISE_CONV_2D") >= 1 and "TRANSPOSE_CONV" not in kinds
    assert lowered.shapes["x"] == [-1, 3, 64]
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)
    assert xnnpack_partitions(tmp_path / "int8.tflite") == 1
    served = tmp_path / "served"
    served.mkdir()
    _, manifest, _, _ = _serve_torch_as_tflite(_conv1d_net(), np.random.default_rng(32).standard_normal(
        (64, 3, 64)).astype(np.float32), "c1d", served, assets, max_share=0.03, mean_share=0.01)
    assert manifest.inputs[0].shape == [-1, 3, 64]


def test_a_conv1d_model_with_a_layer_the_lift_does_not_take_is_lifted_around_it(tmp_path):
    """A Conv1d model that transposes its maps to [N, T, C] in the middle: the lift stops at the
    transpose (the map squeezed back to [N, C, T] for it) and starts again after it (an Unsqueeze),
    and the float TFLite answers as onnxruntime does."""
    from converters.from_torch import to_onnx

    x = np.random.default_rng(31).standard_normal((4, 3, 64)).astype(np.float32)
    source, _ = to_onnx(_conv1d_net(transpose_in_the_middle=True), {"x": x[:2]}, tmp_path / "t.onnx")
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops].count("CONV_2D") + [op.kind for op in lowered.ops].count(
        "DEPTHWISE_CONV_2D") == 3
    write_tflite(lowered, tmp_path / "float.tflite")
    want = _onnx_out(source, "x", x)
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "x", x), want, rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_the_zoo_keyword_spotter_lowers_with_its_residual_1d_blocks(tmp_path):
    """zoo.build_conv1d_kws (the converter benchmark's 1-D family, written as opset 18: ReduceMean
    takes its axes as an input): strided 9-tap Conv1d blocks with 1x1 shortcuts and the mean over
    time lift to 2-D; the float TFLite answers as onnxruntime does, the INT8 one within 3 %."""
    source = zoo.build_conv1d_kws(tmp_path / "kws.onnx")
    x = np.random.default_rng(33).standard_normal((16, 40, 98)).astype(np.float32)
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops].count("CONV_2D") == 10 and lowered.shapes["mfcc"] == [-1, 40, 98]
    want = _onnx_out(source, "mfcc", x)
    write_tflite(lowered, tmp_path / "float.tflite")
    np.testing.assert_allclose(_tflite_out(tmp_path / "float.tflite", "mfcc", x), want, rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(want).max())))
    write_tflite(lowered, tmp_path / "int8.tflite", calibration_ranges(source, lowered, {"mfcc": x}))
    assert np.abs(_tflite_out(tmp_path / "int8.tflite", "mfcc", x) - want).max() <= 0.03 * (want.max() - want.min())


def test_a_pytorch_tcn_with_its_chomp_and_causal_pad_lowers_as_the_2d_model_it_equals(tmp_path):
    """A temporal convolutional network as its reference code writes it: each dilated Conv1d padded
    on both sides, then chomped (x[:, :, :-p], a Slice), or padded in front only (F.pad, a Pad),
    with a 1x1 residual. Lifted to 2-D, the float TFLite answers as onnxruntime does and the INT8
    one within 3 %."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from converters.from_torch import to_onnx

    class Block(nn.Module):
        def __init__(self, cin, cout, k, d):
            super().__init__()
            self.pad = (k - 1) * d
            self.c1 = nn.Conv1d(cin, cout, k, padding=self.pad, dilation=d)
            self.c2, self.down = nn.Conv1d(cout, cout, k, dilation=d), nn.Conv1d(cin, cout, 1)

        def forward(self, x):
            y = torch.relu(self.c1(x)[:, :, :-self.pad])
            y = torch.relu(self.c2(F.pad(y, (self.pad, 0))))
            return torch.relu(y + self.down(x))

    class Tcn(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.fc = nn.Sequential(Block(3, 16, 3, 1), Block(16, 16, 3, 2), Block(16, 16, 3, 4)), \
                nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.blocks(x).mean(-1))

    torch.manual_seed(0)
    x = np.random.default_rng(34).standard_normal((32, 3, 50)).astype(np.float32)
    source, _ = to_onnx(Tcn().eval(), {"x": x[:2]}, tmp_path / "tcn.onnx")
    assert {"Pad", "Slice", "Conv"} <= {n.op_type for n in onnx.load(str(source)).graph.node}
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops].count("CONV_2D") == 9 and lowered.shapes["x"] == [-1, 3, 50]
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)


def test_a_frame_wise_conv1d_model_keeps_its_1d_output(tmp_path):
    """A model that answers per frame ([N, classes, T]: a voice-activity or event detector) is
    lifted too: its output is squeezed back to [N, classes, T], and its lifted copy takes the
    output's calibrated range. The float TFLite answers as onnxruntime does, the INT8 one within
    3 %, with its batch and shapes as the module's."""
    import torch
    from torch import nn

    from converters.from_torch import to_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=2, dilation=2),
                        nn.ReLU(), nn.Conv1d(16, 4, 1)).eval()
    x = np.random.default_rng(35).standard_normal((32, 3, 40)).astype(np.float32)
    source, _ = to_onnx(net, {"x": x[:2]}, tmp_path / "frames.onnx")
    lowered = lower(onnx.load(str(source)))
    assert [op.kind for op in lowered.ops].count("CONV_2D") == 3
    assert lowered.shapes["x"] == [-1, 3, 40] and lowered.shapes[lowered.outputs[0]] == [-1, 4, 40]
    _float_and_int8_answer_as_onnx(source, lowered, x, tmp_path)
