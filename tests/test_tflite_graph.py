"""Unit tests of the TFLite writer's quantization arithmetic, on graphs built by hand."""

import numpy as np
import pytest

from agent.errors import ConversionError
from converters.measure import TfliteSession
from converters.tflite_graph import Graph, Op, activation_qparams, op_counts, write_tflite


@pytest.mark.parametrize("lo,hi", [(-3.0, 5.0), (0.0, 6.0), (0.5, 2.0), (-4.0, -1.0), (0.0, 0.0)])
def test_activation_ranges_take_in_zero_and_both_ends_to_within_a_step(lo, hi):
    scale, zero = activation_qparams(lo, hi)
    assert scale > 0 and -128 <= zero <= 127

    def roundtrip(v):
        return (np.clip(round(v / scale) + zero, -128, 127) - zero) * scale

    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)   # the range always takes in 0 (padding and ReLU need it)
    for v in (lo0, hi0, 0.5 * (lo0 + hi0)):
        assert abs(roundtrip(v) - v) <= 0.51 * scale + 1e-9
    if hi0 > lo0:
        assert (hi0 - lo0) / scale == pytest.approx(255)   # the whole int8 range is used


def _fc_graph(w, b):
    g = Graph(inputs=["x"], outputs=["y"])
    g.shapes.update({"x": [-1, w.shape[1]], "y": [-1, w.shape[0]]})
    g.consts.update({"w": w.astype(np.float32), "b": b.astype(np.float32)})
    g.ops.append(Op("FULLY_CONNECTED", ["x", "w", "b"], ["y"], {"activation": "RELU"}, "fc"))
    return g


def test_a_channel_emptied_by_pruning_keeps_its_bias(tmp_path):
    """All-zero weights in one output channel must not give it a zero scale (its bias would
    overflow int32): it borrows a scale, and its output is its bias."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 8))
    w[2] = 0
    b = np.array([0.1, -0.2, 0.75, 0.0])
    g = _fc_graph(w, b)
    x = rng.random((64, 8)).astype(np.float32)
    want = np.maximum(x @ w.T + b, 0)
    write_tflite(g, tmp_path / "q.tflite", ranges={"x": (0.0, 1.0), "y": (0.0, float(want.max()))})
    got = TfliteSession(tmp_path / "q.tflite").run(None, {"x": x})[0]
    step = want.max() / 255
    np.testing.assert_allclose(got[:, 2], 0.75, atol=step)
    assert np.abs(got - want).max() <= 4 * step


def test_float_and_int8_writers_agree_with_numpy(tmp_path):
    rng = np.random.default_rng(1)
    w, b = rng.normal(0, 0.3, (10, 16)), rng.normal(0, 0.1, 10)
    g = _fc_graph(w, b)
    x = rng.random((32, 16)).astype(np.float32)
    want = np.maximum(x @ w.T + b, 0)
    write_tflite(g, tmp_path / "f.tflite")
    np.testing.assert_allclose(TfliteSession(tmp_path / "f.tflite").run(None, {"x": x})[0], want, atol=1e-5)
    write_tflite(g, tmp_path / "q.tflite", ranges={"x": (0.0, 1.0), "y": (0.0, float(want.max()))}, int8_io=True)
    counts = op_counts(tmp_path / "q.tflite")
    assert counts["ops"] == {"FULLY_CONNECTED": 1} and "float32" not in counts["tensor_dtypes"]
    got = TfliteSession(tmp_path / "q.tflite").run(None, {"x": x})[0]   # quantized in, dequantized out
    assert np.abs(got - want).max() <= 6 * want.max() / 255   # three roundings (x, y, z) and the weights'


def test_a_tensor_calibration_never_saw_is_named(tmp_path):
    g = _fc_graph(np.eye(4), np.zeros(4))
    with pytest.raises(ConversionError, match="calibration saw no values for tensor 'y'"):
        write_tflite(g, tmp_path / "q.tflite", ranges={"x": (0.0, 1.0)})


def test_per_channel_zero_points_are_written_once_and_the_model_still_runs(tmp_path):
    """Two convs with the same channel count: their weights' and biases' all-zero int64 zero
    point vectors are one shared vector in the file, and the results are unchanged."""
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(2)
    g = Graph(inputs=["x"], outputs=["z"])
    g.shapes.update({"x": [1, 6, 6, 8], "y": [1, 6, 6, 8], "z": [1, 6, 6, 8]})
    for i in (1, 2):
        g.consts[f"w{i}"] = rng.normal(0, 0.3, (8, 1, 1, 8)).astype(np.float32)
        g.consts[f"b{i}"] = rng.normal(0, 0.1, 8).astype(np.float32)
    opts = {"padding": "SAME", "stride": (1, 1), "activation": "RELU"}
    g.ops += [Op("CONV_2D", ["x", "w1", "b1"], ["y"], opts, "c1"), Op("CONV_2D", ["y", "w2", "b2"], ["z"], opts, "c2")]
    x = rng.random((1, 6, 6, 8)).astype(np.float32)
    y = np.maximum(x @ g.consts["w1"][:, 0, 0, :].T + g.consts["b1"], 0)
    want = np.maximum(y @ g.consts["w2"][:, 0, 0, :].T + g.consts["b2"], 0)
    path = write_tflite(g, tmp_path / "q.tflite", ranges={"x": (0.0, 1.0), "y": (0.0, float(y.max())),
                                                           "z": (0.0, float(want.max()))})
    buf = path.read_bytes()
    sub = s.Model.GetRootAs(buf, 0).Subgraphs(0)
    where = {}
    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        q = t.Quantization()
        if q is not None and q.ZeroPointLength() == 8:
            where[t.Name().decode()] = q._tab.Vector(q._tab.Offset(10))  # field 3: zero_point
    assert {"w1/q", "b1/q", "w2/q", "b2/q"} <= set(where), where
    assert len(set(where.values())) == 1      # four tensors, one vector in the file
    got = TfliteSession(path).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 6 * want.max() / 255   # three roundings (x, y, z) and the weights'


def test_a_dead_layer_with_a_fused_relu6_still_loads_without_xnnpack(tmp_path):
    """A layer whose outputs calibration saw as (near) zero gets the smallest scale; with a fused
    RELU6, LiteRT's own kernels must still place 6.0 on its int8 grid in an int32 ("no integer
    overflow from quantization"), or the model fails to load where XNNPACK does not take it."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    g = _fc_graph(np.zeros((4, 8)), np.zeros(4))
    g.ops[0].options["activation"] = "RELU6"
    write_tflite(g, tmp_path / "q.tflite", ranges={"x": (0.0, 1.0), "y": (0.0, 0.0)})
    it = Interpreter(model_path=str(tmp_path / "q.tflite"),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    x = np.random.default_rng(0).random((1, 8)).astype(np.float32)
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    assert np.abs(it.get_tensor(it.get_output_details()[0]["index"])).max() == 0.0


def _activations_graph(channels: int = 8, steepest: float = 0.6) -> Graph:
    """Layers as a float TFLite source holds them: ADD then a standalone RELU (BlazeFace's residual),
    a RELU6 after a max pool (no layer to fuse it into), a conv then PRELU (MediaPipe's face
    models), and a RESHAPE whose shape is an option only."""
    rng = np.random.default_rng(17)
    c = channels
    g = Graph(inputs=["x"], outputs=["y"])
    g.shapes.update({"x": [-1, 8, 8, c], "a": [-1, 8, 8, c], "b": [-1, 8, 8, c], "s": [-1, 8, 8, c],
                     "r": [-1, 8, 8, c], "p": [-1, 4, 4, c], "q": [-1, 4, 4, c], "c3": [-1, 4, 4, c],
                     "z": [-1, 4, 4, c], "y": [-1, 16 * c]})
    for w in ("w1", "w2", "w3"):
        g.consts[w] = (rng.standard_normal((c, 3, 3, c)) * 0.3).astype(np.float32)
        g.consts[f"{w}b"] = rng.standard_normal(c).astype(np.float32) * 0.1
    g.consts["slope"] = rng.uniform(-0.2, steepest, (1, 1, c)).astype(np.float32)
    conv = {"padding": "SAME", "stride": (1, 1), "activation": "NONE"}
    g.ops = [Op("CONV_2D", ["x", "w1", "w1b"], ["a"], dict(conv), "conv1"),
             Op("CONV_2D", ["x", "w2", "w2b"], ["b"], dict(conv), "conv2"),
             Op("ADD", ["a", "b"], ["s"], {"activation": "NONE"}, "add"),
             Op("RELU", ["s"], ["r"], {}, "relu"),
             Op("MAX_POOL_2D", ["r"], ["p"], {"padding": "VALID", "stride": (2, 2), "filter": (2, 2)}, "pool"),
             Op("RELU6", ["p"], ["q"], {}, "relu6"),
             Op("CONV_2D", ["q", "w3", "w3b"], ["c3"], dict(conv), "conv3"),
             Op("PRELU", ["c3", "slope"], ["z"], {}, "prelu"),
             Op("RESHAPE", ["z"], ["y"], {"new_shape": np.array([-1, 16 * c], np.int32)}, "flat")]
    return g


@pytest.mark.parametrize("steepest,muls", [(0.6, 2), (1.5, 4)])
def test_standalone_relus_and_prelus_become_ops_xnnpack_runs_in_int8(tmp_path, steepest, muls):
    """XNNPACK takes no int8 RELU, RELU6 or PRELU of their own (eight conv + RELU layers ran at 1.45x
    their FP32 time, at 0.28x fused): a RELU that alone reads an ADD is fused into it when the file
    is read; the rest are written as MUL (a fused activation) and ADD: a PRELU whose slopes are at
    most 1 as x + (1 - slope) * relu(-x), one MUL and an ADD, one with a steeper slope as
    relu(x) + slope * min(x, 0), three MULs and an ADD. The INT8 model answers as the float one
    does, within 3 % of the output's range."""
    from converters.tflite_reader import calibration_ranges, read_tflite

    write_tflite(_activations_graph(steepest=steepest), tmp_path / "source.tflite")
    graph, names = read_tflite(tmp_path / "source.tflite")
    kinds = [op.kind for op in graph.ops]
    assert "RELU" not in kinds and kinds.count("RELU6") == 1 and kinds.count("PRELU") == 1
    assert next(op for op in graph.ops if op.kind == "ADD").options["activation"] == "RELU"
    x = np.random.default_rng(18).standard_normal((32, 8, 8, 8)).astype(np.float32)
    ranges = calibration_ranges(tmp_path / "source.tflite", graph, names, {"x": x})
    write_tflite(graph, tmp_path / "int8.tflite", ranges)
    ops = op_counts(tmp_path / "int8.tflite")["ops"]
    assert not {"RELU", "RELU6", "PRELU"} & set(ops), ops
    assert ops["MUL"] == muls and ops["ADD"] == 2  # RELU6 as a MUL; the PRELU as above; the residual ADD
    want = TfliteSession(tmp_path / "source.tflite").run(None, {"x": x})[0]
    got = TfliteSession(tmp_path / "int8.tflite").run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.03 * (want.max() - want.min()), np.abs(got - want).max()


def _with_custom_tail(tmp_path):
    """A float .tflite whose last op is a custom one (as MediaPipe's face landmarker with attention
    ends in its Landmarks2TransformMatrix): x -> FC -> h -> custom -> y."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(21)
    g = Graph(inputs=["x"], outputs=["y"])
    g.shapes.update({"x": [-1, 8], "h": [-1, 6], "y": [-1, 4]})
    g.consts.update({"w1": rng.standard_normal((6, 8)).astype(np.float32), "b1": np.zeros(6, np.float32),
                     "w2": rng.standard_normal((4, 6)).astype(np.float32), "b2": np.zeros(4, np.float32)})
    g.ops = [Op("FULLY_CONNECTED", ["x", "w1", "b1"], ["h"], {"activation": "NONE"}, "fc1"),
             Op("FULLY_CONNECTED", ["h", "w2", "b2"], ["y"], {"activation": "NONE"}, "fc2")]
    write_tflite(g, tmp_path / "m.tflite")
    model = s.ModelT.InitFromPackedBuf((tmp_path / "m.tflite").read_bytes(), 0)
    custom = s.OperatorCodeT()
    custom.builtinCode, custom.deprecatedBuiltinCode, custom.customCode = s.BuiltinOperator.CUSTOM, 32, \
        "Landmarks2TransformMatrix"
    model.operatorCodes.append(custom)
    model.subgraphs[0].operators[-1].opcodeIndex = len(model.operatorCodes) - 1
    model.subgraphs[0].operators[-1].builtinOptionsType, model.subgraphs[0].operators[-1].builtinOptions = 0, None
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    (tmp_path / "custom.tflite").write_bytes(bytes(builder.Output()))
    return tmp_path / "custom.tflite", g


def test_a_custom_op_is_refused_by_its_name_with_where_to_cut(tmp_path):
    """MediaPipe's models hold ops of its own: the writer has no form for them; the error names the
    op and the --cut-at that ends the model before it."""
    from converters.tflite_reader import read_tflite

    path, _ = _with_custom_tail(tmp_path)
    with pytest.raises(ConversionError, match=r"custom op Landmarks2TransformMatrix \(op 1\) has no form") as caught:
        read_tflite(path)
    assert caught.value.fix.startswith("end the model before it with --cut-at h and do its work on the board")


def test_cut_at_ends_a_tflite_source_before_an_op_it_cannot_map(tmp_path):
    """`--cut-at h` converts what leads to h (calibrated on the float model as kept: LiteRT cannot
    even load the file whole), and the bundle's output is h, within 3 % of its float range."""
    from converters.convert import ConvertOptions
    from converters.from_tflite import convert_tflite

    path, g = _with_custom_tail(tmp_path)
    x = np.random.default_rng(22).standard_normal((64, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    report = convert_tflite(path, tmp_path / "calib.npz", tmp_path / "cut.ewb", None, None,
                            ConvertOptions(name="cut", cut_at=["h"], allow_worse=True))
    assert report["graph"]["ops"]["FULLY_CONNECTED"] == 1
    import tarfile

    with tarfile.open(tmp_path / "cut.ewb") as tar:
        (tmp_path / "cut.tflite").write_bytes(tar.extractfile("model.tflite").read())
    session = TfliteSession(tmp_path / "cut.tflite")
    assert [o.name for o in session.get_outputs()] == ["h"]
    want = x @ g.consts["w1"].T
    got = session.run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 0.03 * (want.max() - want.min())
    with pytest.raises(ConversionError, match="--cut-at hh: the model has no tensor 'hh'.*such as h"):
        convert_tflite(path, tmp_path / "calib.npz", tmp_path / "no.ewb", None, None,
                       ConvertOptions(name="cut", cut_at=["hh"]))
