"""The converter: real INT8 QDQ output, measured against FP32, and clean failures on bad input."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle import open_bundle
from agent.signing import load_public_key
from converters.onnx_int8 import int8_summary


@pytest.fixture(scope="module")
def extracted_v2(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    with tarfile.open(assets.v2) as tar:
        for name in ("model.onnx", "reference.npz"):
            (out / name).write_bytes(tar.extractfile(name).read())
    return out


def test_output_is_int8_qdq_with_no_float_weights_left(extracted_v2):
    s = int8_summary(extracted_v2 / "model.onnx")
    assert s["ops"].get("QuantizeLinear", 0) >= 3 and s["ops"].get("DequantizeLinear", 0) >= 6
    assert s["int8_initializers"] >= 3            # conv + two gemm weight tensors at least
    assert s["float_weight_tensors"] == 0         # every weight matrix became int8


def test_int8_model_stays_close_to_fp32(assets, extracted_v2):
    x, y = (lambda d: (d["input"], d["labels"]))(np.load(assets.eval))
    fp32 = ort.InferenceSession(str(assets.fp32_v2), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    int8 = ort.InferenceSession(str(extracted_v2 / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    agreement = (fp32.argmax(1) == int8.argmax(1)).mean()
    drop_pp = 100 * ((fp32.argmax(1) == y).mean() - (int8.argmax(1) == y).mean())
    assert agreement >= 0.98, agreement
    assert drop_pp <= 0.5, drop_pp
    assert np.abs(fp32 - int8).mean() <= 0.02 * (fp32.max() - fp32.min())


def test_weights_keep_to_seven_bits_unless_full_range_is_asked_for(assets, tmp_path):
    """onnxruntime's x86 int8 kernels without VNNI saturate with 8-bit weights; 7-bit ones are exact
    everywhere. --full-range-weights uses all 8 for VNNI / ARM boards."""
    import onnx
    from onnx import numpy_helper

    from converters.convert import ConvertOptions, convert_onnx

    def widest(bundle):
        with tarfile.open(bundle) as tar:
            model = onnx.load_from_string(tar.extractfile("model.onnx").read())
        return max(int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max()) for i in model.graph.initializer
                   if i.data_type == 3 and len(i.dims) >= 2)

    convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "seven.ewb", options=ConvertOptions(name="d"))
    convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "eight.ewb",
                 options=ConvertOptions(name="d", full_range_weights=True, allow_worse=True))
    assert widest(tmp_path / "seven.ewb") <= 64 < widest(tmp_path / "eight.ewb") <= 127


def test_manifest_carries_the_measured_report(assets):
    m = open_bundle(assets.v2, [load_public_key(assets.pub)]).manifest
    q = m.quality
    for key in ("accuracy_fp32", "accuracy_int8", "top1_agreement", "max_abs_err", "latency_p50_ms_fp32",
                "latency_p50_ms_int8", "fp32_bytes", "int8_bytes"):
        assert key in q, key
    assert q["int8_bytes"] < q["fp32_bytes"]
    assert q["accuracy_fp32"] == pytest.approx(assets.accuracy_v2, abs=1e-4)  # measured on the same held-out split
    assert m.selftest.atol > 0 and m.selftest.min_top1_agreement == 1.0


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_a_readable_report(assets, tmp_path):
    out = tmp_path / "digits.ewb"
    r = _convert(assets.fp32_v1, "--calibration", assets.calib, "--eval", assets.eval, "-o", out,
                 "--key", assets.key, "--name", "digits", "--version", "7", "--per-tensor")
    assert r.returncode == 0, r.stderr
    assert "digits v7" in r.stdout and "signed" in r.stdout and "top-1 accuracy" in r.stdout
    assert "latency p50" in r.stdout and "INT8 vs FP32" in r.stdout
    assert open_bundle(out, [load_public_key(assets.pub)]).manifest.quality["calibration"].startswith("minmax, per-tensor")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, fragment", [
    ("not_a_model", "is not a valid ONNX model"),
    ("missing_model", "no such file"),
    ("wrong_shape", "has shape [40, 8, 8], the model takes Nx1x8x8"),
    ("wrong_dtype", "is float64, the model takes float32"),
    ("too_few", "has 5 samples, at least 16"),
    ("nan", "NaN"),
    ("bad_key", "cannot read signing key"),
])
def test_bad_input_gives_one_line_and_leaves_no_file(assets, tmp_path, case, fragment):
    model, key = assets.fp32_v1, None
    x = np.load(assets.calib)["input"]
    calib = assets.calib
    if case == "not_a_model":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"this is a text file, not a protobuf" * 20)
    elif case == "missing_model":
        model = tmp_path / "nope.onnx"
    elif case == "wrong_shape":
        calib = _npz(tmp_path / "c.npz", input=x[:40, 0])
    elif case == "wrong_dtype":
        calib = _npz(tmp_path / "c.npz", input=x.astype(np.float64))
    elif case == "too_few":
        calib = _npz(tmp_path / "c.npz", input=x[:5])
    elif case == "nan":
        bad = x.copy()
        bad[3, 0, 2, 2] = np.nan
        calib = _npz(tmp_path / "c.npz", input=bad)
    elif case == "bad_key":
        key = tmp_path / "missing.key"
    out = tmp_path / "out.ewb"
    r = _convert(model, "--calibration", calib, "-o", out, *(["--key", key] if key else []))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeward convert: error:"), r.stderr
    assert fragment in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_fp32_and_int8_latency_are_timed_in_alternating_rounds():
    """A slow patch of the host must fall on both models alike: their timed calls alternate
    in rounds across the whole measurement instead of one model after the other."""
    from converters import measure

    order = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def get_outputs(self):
            return [type("O", (), {"name": "y"})()]

        def run(self, names, feeds):
            order.append(self.name)

    res = measure.latency_ms({"fp32": Recorder("fp32"), "int8": Recorder("int8")}, {}, runs=40, rounds=4, warmup=2)
    assert set(res) == {"fp32", "int8"} and all(r["p50"] <= r["p95"] for r in res.values())
    timed = order[4:]                               # after each model's warm-up
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert timed.count("fp32") == timed.count("int8") == 4 * (10 + 1)
    assert switches == 2 * 4 - 1                   # fp32, int8, fp32, int8, ... in 4 rounds each


def test_the_self_test_input_travels_as_8_bit_codes_on_the_models_input_grid(extracted_v2):
    """A float input the model quantizes first is stored as that op's codes (a quarter of the
    bytes); the expected outputs are the model's on exactly the values the board rebuilds."""
    import onnx

    from agent import reference
    from converters.onnx_graph import input_grids

    scale, zero_point, dtype = input_grids(onnx.load(str(extracted_v2 / "model.onnx")))["input"]
    with np.load(extracted_v2 / "reference.npz") as ref:
        codes, stored_scale = ref["input.input"], float(ref["input_scale.input"])
        expected = ref["expected.logits"]
    assert codes.dtype == np.dtype(dtype) and stored_scale == pytest.approx(scale, rel=1e-7)
    feeds, want = reference.load(extracted_v2 / "reference.npz", ["input"], "digits")
    assert feeds["input"].dtype == np.float32 and len(np.unique(feeds["input"])) > 4
    # every value the board feeds lies on the grid, so the model's QuantizeLinear gives back the codes
    assert np.array_equal(np.round(feeds["input"] / scale) + zero_point, codes.astype(np.float64))
    sess = ort.InferenceSession(str(extracted_v2 / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, feeds)[0], expected, atol=1e-6)
    assert np.array_equal(want["logits"], expected)


def test_reference_codes_without_a_usable_grid_fail_the_self_test_clearly(tmp_path):
    from agent import reference
    from agent.errors import SelfTestError

    np.savez(tmp_path / "r.npz", **{"input.x": np.zeros((1, 4), np.float32), "input_scale.x": np.float32(0.1),
                                     "input_zero_point.x": np.int32(0)})
    with pytest.raises(SelfTestError, match="codes but no valid grid"):
        reference.load(tmp_path / "r.npz", ["x"], "m")
    with pytest.raises(SelfTestError, match="lacks input 'y'"):
        reference.load(tmp_path / "r.npz", ["y"], "m")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(SelfTestError, match="unreadable"):
        reference.load(tmp_path / "bad.npz", ["x"], "m")


def _stamp_case(nodes, opsets, ir, inits=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = ir
    return model


def test_the_stamp_drops_unused_operator_sets_and_lowers_the_ir_version():
    from onnx import helper

    from converters.onnx_graph import stamp_for_old_runtimes

    model = _stamp_case([helper.make_node("Relu", ["x"], ["y"])],
                        [("", 17), ("ai.onnx.ml", 5), ("com.microsoft.nchwc", 1), ("org.pytorch.aten", 1)], ir=11)
    assert stamp_for_old_runtimes(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 8
    assert not stamp_for_old_runtimes(model)  # nothing left to change


def test_the_stamp_keeps_operator_sets_used_inside_subgraphs():
    from onnx import TensorProto, helper

    from converters.onnx_graph import stamp_for_old_runtimes

    branch = helper.make_graph([helper.make_node("Gelu", ["x"], ["z"], domain="com.microsoft")], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    model = _stamp_case([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                        [("", 17), ("com.microsoft", 1), ("ai.onnx.ml", 5)], ir=10, inits=[cond])
    stamp_for_old_runtimes(model)
    assert {o.domain for o in model.opset_import} == {"", "com.microsoft"} and model.ir_version == 8


def test_the_stamp_keeps_the_operator_sets_of_local_functions():
    from onnx import helper

    from converters.onnx_graph import stamp_for_old_runtimes

    double = helper.make_function("edge.local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
    model = _stamp_case([helper.make_node("Double", ["x"], ["y"], domain="edge.local")],
                        [("", 17), ("edge.local", 1), ("ai.onnx.ml", 5)], ir=10)
    model.functions.append(double)
    stamp_for_old_runtimes(model)
    assert {o.domain for o in model.opset_import} == {"", "edge.local"} and model.ir_version == 8


def test_the_stamp_keeps_an_ir_version_the_model_needs_for_its_tensors():
    """4-bit tensors came with IR 10 (the checker does not tie types to IR versions, runtimes do)."""
    import onnx
    from onnx import TensorProto, helper

    from converters.onnx_graph import stamp_for_old_runtimes

    w = helper.make_tensor("w", TensorProto.INT4, [4], [1, -2, 3, -4])
    model = _stamp_case([helper.make_node("Relu", ["x"], ["y"])], [("", 17), ("ai.onnx.ml", 5)], ir=10, inits=[w])
    onnx.checker.check_model(model)
    assert stamp_for_old_runtimes(model)  # the unused import still goes
    assert model.ir_version == 10 and [o.domain for o in model.opset_import] == [""]


def _save_mlp(path, nodes, inits=(), x_shape=("n", 16), y_shape=("n", 10)):
    """A small float model from nodes: input x, output y, opset 17, saved at an IR old runtimes read."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_weights_written_as_constant_nodes_are_quantized_too(tmp_path):
    """torch.export programs write every weight as a Constant node; onnxruntime's quantizer only
    quantizes initializers, so without lifting them the weights stayed float and the model grew."""
    from onnx import helper, numpy_helper

    from converters.convert import ConvertOptions, convert_onnx

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((64, 256), (256, 10)))
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    source = _save_mlp(tmp_path / "consts.onnx", nodes, x_shape=("n", 64))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    # dynamic INT8 quantizes the file as given (static INT8's pre-processing folds constants, where it runs)
    report = convert_onnx(source, tmp_path / "calib.npz", tmp_path / "c.ewb",
                          options=ConvertOptions(name="c", precision="int8-dynamic"))
    assert report["graph"]["int8_initializers"] >= 2 and report["graph"]["float_weight_tensors"] == 0
    assert report["int8_vs_fp32"] < 0.4 and report["quality"]["top1_agreement"] >= 0.9


def test_a_model_that_fails_on_the_data_is_one_line_naming_the_node(tmp_path):
    """A graph that declares a dynamic batch but holds a fixed one (a reshape traced at batch 1)
    fails inside onnxruntime; the error names the node and the data, not onnxruntime's source."""
    from onnx import helper, numpy_helper

    from agent.errors import ConversionError
    from converters.convert import ConvertOptions, convert_onnx

    shape = numpy_helper.from_array(np.array([1, 4, 4], np.int64), "shape")
    source = _save_mlp(tmp_path / "baked.onnx", [helper.make_node("Reshape", ["x", "shape"], ["y"], name="fold")],
                       [shape], y_shape=("n", 4, 4))
    np.savez(tmp_path / "calib.npz", x=np.ones((32, 16), np.float32))
    with pytest.raises(ConversionError) as err:
        convert_onnx(source, tmp_path / "calib.npz", tmp_path / "b.ewb", options=ConvertOptions(name="b"))
    text = str(err.value)
    assert text.startswith("the FP32 model fails on the data (x [32, 16]): Reshape node 'fold': ")
    assert "onnxruntime_src" not in text and "\n" not in text and not (tmp_path / "b.ewb").exists()


def test_the_quantizers_own_log_lines_stay_out_of_the_users_way(caplog, capfd):
    """onnxruntime's quantizer warns through the root logger; those lines go to edgeward.convert at
    debug level, and no handler is left on the root logger (its first warning would add one)."""
    import logging

    from converters.onnx_int8 import quiet_quantizer

    root = logging.getLogger()
    before = list(root.handlers)
    caplog.set_level(logging.DEBUG, logger="edgeward.convert")
    with quiet_quantizer():
        logging.warning("Please consider to run pre-processing before quantization.")
    assert root.handlers == before and root.filters == []
    assert "WARNING:root" not in capfd.readouterr().err
    assert [(r.name, r.levelno) for r in caplog.records if "pre-processing" in r.getMessage()] == \
        [("edgeward.convert", logging.DEBUG)]


def test_pre_processing_goes_on_without_symbolic_shapes_where_those_give_up(tmp_path, caplog):
    """onnxruntime's symbolic shape inference asserts on a reshape whose target rank it cannot
    tell (attention blocks have them); the pre-processing then runs without it."""
    import logging

    from onnx import TensorProto, helper

    import onnx

    from converters.onnx_int8 import _pre_process

    source = tmp_path / "reshape.onnx"
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(source))
    caplog.set_level(logging.WARNING, logger="edgeward.convert")
    assert _pre_process(source, tmp_path / "prepared.onnx") == tmp_path / "prepared.onnx"
    assert (tmp_path / "prepared.onnx").exists() and not caplog.records


def test_quantizing_leaves_nothing_in_the_users_working_directory(tmp_path, monkeypatch):
    """Where its symbolic shape inference gives up (here on a text detector's upsampling head),
    onnxruntime saves a "sym_shape_infer_temp.onnx" and its external data in the working
    directory. A user's folder must get the bundle they asked for and nothing else."""
    import os

    from converters import zoo
    from converters.onnx_int8 import quantize_static

    source = zoo.build_text_detector_like(tmp_path / "det.onnx", size=32)
    here = tmp_path / "users-folder"
    here.mkdir()
    monkeypatch.chdir(here)
    rng = np.random.default_rng(0)
    calibration = {"image": rng.random((8, 3, 32, 32), np.float32)}
    quantize_static(source, tmp_path / "det-int8.onnx", calibration)
    assert os.listdir(here) == []
    assert (tmp_path / "det-int8.onnx").exists()
    assert os.getcwd() == str(here)  # and the working directory is the user's again


def test_onnxruntime_errors_keep_their_details_on_one_line():
    """onnxruntime puts what it got and expected on lines of their own, after a status prefix."""
    from onnx import TensorProto, helper

    from agent.errors import runtime_message

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as err:
        sess.run(None, {"x": np.ones((3, 4), np.float32)})
    assert "\n" in str(err.value)
    text = runtime_message(err.value)
    assert text.startswith("Got invalid dimensions for input: x") and "index: 0 Got: 3 Expected: 1" in text
    assert "\n" not in text and "ONNXRuntimeError" not in text
    assert runtime_message(ValueError("first\nsecond")) == "first"  # other runtimes: their first line


def test_a_model_exported_at_opset_11_gets_per_channel_int8(assets, tmp_path):
    """Paddle2ONNX and older tf2onnx export at opset 11 or 12, before DequantizeLinear had the
    `axis` that per-channel weights need; onnxruntime's quantizer writes it all the same, which
    made an invalid model. The converter quantizes such a model at opset 13."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.5, (8, 1, 3, 3)), "b1": rng.normal(0, 0.1, 8),
               "w2": rng.normal(0, 0.2, (16, 8, 3, 3)), "b2": rng.normal(0, 0.1, 16),
               "w3": rng.normal(0, 0.3, (16, 10)), "b3": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"])]
    graph = helper.make_graph(nodes, "cnn11", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.save(model, str(tmp_path / "cnn11.onnx"))
    out = tmp_path / "cnn11.ewb"
    r = _convert(tmp_path / "cnn11.onnx", "--calibration", assets.calib, "--eval", assets.eval, "-o", out,
                 "--key", assets.key, "--allow-worse", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quality"]["top1_agreement"] >= 0.9
    with tarfile.open(out) as tar:
        shipped = onnx.load_from_string(tar.extractfile("model.onnx").read())
    onnx.checker.check_model(shipped)
    assert next(o.version for o in shipped.opset_import if o.domain in ("", "ai.onnx")) >= 13
    axes = [a.i for n in shipped.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes, "per-channel weights carry an axis"


def test_cut_at_keeps_what_the_named_tensors_need_and_nothing_else():
    """Cut at an existing output and an inner tensor: the model computes those two, the nodes,
    weights and input that only led elsewhere are gone, and the outputs keep their types."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from converters.onnx_graph import cut_at

    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w")
    unused = numpy_helper.from_array(np.ones(4, np.float32), "bias_of_z")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("Add", ["y", "bias_of_z"], ["b"]), helper.make_node("Mul", ["b", "scale"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                                           helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])], [w, unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cut_at(model, ["y", "a"])
    onnx.checker.check_model(model)
    g = model.graph
    assert [o.name for o in g.output] == ["y", "a"]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in g.output)
    assert [n.op_type for n in g.node] == ["MatMul", "Relu"]
    assert [i.name for i in g.input] == ["x"] and [t.name for t in g.initializer] == ["w"]
    x = np.array([[1, -2, 3, -4]], np.float32)
    y, a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(a, x @ (np.arange(16, dtype=np.float32).reshape(4, 4) / 10), rtol=1e-6)
    np.testing.assert_allclose(y, np.maximum(a, 0))


def _boxes_and_scores_bundle(tmp_path, key):
    """A detector-shaped bundle: boxes in pixels (0..~600) and scores in 0..1, converted for real."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from converters.convert import ConvertOptions, convert_onnx

    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "wb"),
             numpy_helper.from_array(np.float32(100.0), "pixels"),
             numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "ws")]
    nodes = [helper.make_node("MatMul", ["x", "wb"], ["b"]), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Mul", ["br", "pixels"], ["boxes"]),
             helper.make_node("MatMul", ["x", "ws"], ["s"]), helper.make_node("Sigmoid", ["s"], ["scores"])]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "det.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    convert_onnx(tmp_path / "det.onnx", tmp_path / "calib.npz", tmp_path / "det.ewb", key, tmp_path / "calib.npz",
                 ConvertOptions(name="det", allow_worse=True))
    return tmp_path / "det.ewb"


def test_each_output_is_held_to_a_tolerance_of_its_own_range(assets, tmp_path):
    """Scores all 0.3 off would pass a tolerance made for boxes in pixels: the self-test holds
    each output to its own, and names the one that strayed."""
    import tarfile

    from agent.budget import Budget
    from agent.engine import Engine
    from agent.errors import SelfTestError
    from agent.reference import tolerances
    from agent.store import Store
    from conftest import repack

    good = _boxes_and_scores_bundle(tmp_path, assets.key)
    with tarfile.open(good) as tar:
        (tmp_path / "reference.npz").write_bytes(tar.extractfile("reference.npz").read())
    allowed = tolerances(tmp_path / "reference.npz", "det")
    manifest_atol = open_bundle(good, [load_public_key(assets.pub)]).manifest.selftest.atol
    assert allowed["scores"] <= 0.05 < 0.3 < manifest_atol == pytest.approx(allowed["boxes"], rel=1e-5)
    engine = Engine(Budget(2048))
    assert engine.load(Store(tmp_path / "a").install(open_bundle(good, [load_public_key(assets.pub)]))).self_test()["max_abs_err"] < 0.05

    def scores_off(arrays):
        arrays["expected.scores"] = np.clip(arrays["expected.scores"] + 0.3, 0, 1.3)
    bad = repack(good, tmp_path / "bad.ewb", assets.key, reference_edit=scores_off)
    with pytest.raises(SelfTestError, match=r"output 'scores' strays 0\.3 from the host's \(allowed 0\.0"):
        engine.load(Store(tmp_path / "b").install(open_bundle(bad, [load_public_key(assets.pub)]))).self_test()

    def as_before(arrays):  # a bundle made before per-output tolerances: the manifest's one holds
        for k in [k for k in arrays if k.startswith("atol.")]:
            del arrays[k]
        arrays["expected.scores"] = np.clip(arrays["expected.scores"] + 0.3, 0, 1.3)
    old = repack(good, tmp_path / "old.ewb", assets.key, reference_edit=as_before)
    assert engine.load(Store(tmp_path / "c").install(open_bundle(old, [load_public_key(assets.pub)]))).self_test()["max_abs_err"] >= 0.29

    def garbled(arrays):
        arrays["atol.scores"] = np.array(["wide"])
    bad = repack(good, tmp_path / "garbled.ewb", assets.key, reference_edit=garbled)
    with pytest.raises(SelfTestError, match="tolerance for output 'scores' is not a number"):
        engine.load(Store(tmp_path / "d").install(open_bundle(bad, [load_public_key(assets.pub)]))).self_test()
    engine.close()
