"""The bare-runtime reference of the agent's benchmarks (agent/barebench.py), on ONNX files."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from agent.barebench import run_bare
from agent.errors import EdgewardError


def _relu_model(path, batch):
    """y = relu(x), x of shape [batch, 4] (batch an int: fixed; a string: dynamic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # what opset 13 needs: every onnxruntime a board may have reads it
    onnx.save(model, str(path))
    return str(path)


def test_onnx_runs_at_each_batch_size_in_a_process_that_holds_only_the_runtime(assets):
    ref = run_bare("onnxruntime", str(assets.fp32_v1), threads=1, seconds=0.2, batches=[1, 16],
                   inputs=str(assets.eval))
    assert ref["package"].startswith("onnxruntime ")
    assert ref["foreign"] == []
    assert {b: r["rows"] for b, r in ref["batches"].items()} == {"1": 1, "16": 16}
    assert ref["batches"]["16"]["rows_per_s"] > ref["batches"]["1"]["rows_per_s"] > 0
    assert 0 < ref["p50_ms"] < 50
    assert 15 < ref["rss_mb"] < 500 and 0 < ref["pss_mb"] <= ref["rss_mb"]


def test_a_fixed_batch_axis_runs_at_its_own_size(tmp_path):
    path = _relu_model(tmp_path / "fixed.onnx", 2)
    ref = run_bare("onnxruntime", path, seconds=0.1, batches=[8])
    assert ref["batches"]["8"]["rows"] == 2  # what the agent pads a batch of this model to
    dynamic = run_bare("onnxruntime", _relu_model(tmp_path / "dyn.onnx", "n"), seconds=0.1, batches=[8])
    assert dynamic["batches"]["8"]["rows"] == 8
    # random inputs without numpy.random, whose 6.5 MB the agent's worker does not hold
    assert ref["foreign"] == dynamic["foreign"] == []


def test_a_file_the_runtime_cannot_load_is_named_with_the_runtimes_own_words(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EdgewardError) as err:
        run_bare("onnxruntime", str(junk), seconds=0.1)
    assert str(junk) in str(err.value) and "INVALID_PROTOBUF" in str(err.value)


def test_a_free_axis_past_the_first_takes_the_given_inputs_length(tmp_path):
    """Audio of any length ([N, T]): made-up sizes would be 1, which such a model cannot take;
    the inputs given (a real window) say T, and the rows asked for still say N."""
    import numpy as np
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = numpy_helper.from_array(np.ones((37, 4), np.float32), "w")  # only a window of 37 samples fits
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "window", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(tmp_path / "window.onnx"))
    np.savez(tmp_path / "window.npz", x=np.zeros((1, 37), np.float32))
    ref = run_bare("onnxruntime", str(tmp_path / "window.onnx"), seconds=0.1, batches=[4],
                   inputs=str(tmp_path / "window.npz"))
    assert ref["batches"]["4"]["rows"] == 4 and ref["p50_ms"] > 0
    with pytest.raises(EdgewardError, match="the bare onnxruntime run"):  # without them: t = 1
        run_bare("onnxruntime", str(tmp_path / "window.onnx"), seconds=0.1)
