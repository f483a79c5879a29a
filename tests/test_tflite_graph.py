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
