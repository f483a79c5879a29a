"""Structured channel pruning: whole convolution channels removed with the inputs that read them,
so later layers shrink too. Exactness is proven on models whose dropped filters are planted zeros
(removing them must not change a single output); the real effect is in scripts/bench_convert.py."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import ConversionError
from converters import zoo
from converters.convert import ConvertOptions, convert_onnx
from converters.prune_channels import prune_channels


def _run(path, name, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


def _weights(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _plant_zero_filters(src, dst, layer_weights: dict[str, list[int]]):
    """Zero whole filters (and their biases) so that removing them is exact."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        for wname, chans in layer_weights.items():
            if init.name in (wname, wname.replace("_w", "_b")):
                arr = numpy_helper.to_array(init).copy()
                arr[chans] = 0
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(dst))
    return dst


def test_removing_zero_filters_of_the_digits_cnn_changes_nothing_and_shrinks_the_next_layer(tmp_path):
    params, _ = zoo.train_digits_cnn(epochs=2)
    params["conv_w"][[1, 5]] = 0
    params["conv_b"][[1, 5]] = 0
    zoo.cnn_to_onnx(params, tmp_path / "m.onnx")
    report = prune_channels(tmp_path / "m.onnx", tmp_path / "p.onnx", 0.25)
    assert report["layers"] == [{"layer": report["layers"][0]["layer"], "channels": 8, "kept": 6}]
    w = _weights(tmp_path / "p.onnx")
    assert w["conv_w"].shape == (6, 1, 3, 3) and w["fc1_w"].shape == (6 * 16, 32)  # NCHW flatten rows follow
    x = zoo.digits_dataset()[2][:64]
    np.testing.assert_allclose(_run(tmp_path / "p.onnx", "input", x), _run(tmp_path / "m.onnx", "input", x),
                               atol=1e-5)
    assert report["bytes_after"] < report["bytes_before"]


def test_depthwise_chains_are_pruned_through_and_stay_exact(tmp_path):
    zoo.build_mobilenet_like(tmp_path / "m.onnx", size=32)
    # a quarter of every pointwise layer's filters (and the stem's) are zero: exactly what 0.25 removes
    widths = {"stem_w": 16, **{f"pw{i}_w": c for i, c in enumerate([32, 64, 64, 128, 128, 256, 256])}}
    drop = {k: list(range(1, c, 4)) for k, c in widths.items()}
    _plant_zero_filters(tmp_path / "m.onnx", tmp_path / "z.onnx", drop)
    report = prune_channels(tmp_path / "z.onnx", tmp_path / "p.onnx", 0.25)
    w = _weights(tmp_path / "p.onnx")
    assert w["stem_w"].shape[0] == 12 and w["dw0_w"].shape == (12, 1, 3, 3) and w["pw0_w"].shape[1] == 12
    assert w["pw0_w"].shape[0] == 24 and w["dw1_w"].shape[0] == 24 and w["pw1_w"].shape[1] == 24
    assert w["pw6_w"].shape[0] == 192 and w["fc_w"].shape == (192, 10)   # through GlobalAveragePool + Flatten
    groups = {n.output[0]: a.i for n in onnx.load(str(tmp_path / "p.onnx")).graph.node
              for a in n.attribute if a.name == "group"}
    assert groups["dw0_c"] == 12 and groups["dw1_c"] == 24
    assert report["channels_after"] < report["channels_before"]
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "p.onnx", "image", x), _run(tmp_path / "z.onnx", "image", x),
                               atol=1e-5)


def test_a_convolution_feeding_an_add_is_left_whole(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "x"], ["y"], name="residual")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "r.onnx"))
    with pytest.raises(ConversionError, match="no convolution's channels can be removed.*--prune"):
        prune_channels(tmp_path / "r.onnx", tmp_path / "p.onnx", 0.5)
    assert not (tmp_path / "p.onnx").exists()


def test_convert_with_channel_pruning_reports_it_and_ships_the_smaller_model(assets, tmp_path):
    r = convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "p.ewb", assets.key, assets.eval,
                     ConvertOptions(name="digits", prune_channels=0.25, format="both", allow_worse=True))
    for report in (r, r["also"]):
        assert report["channel_pruning"]["channels_before"] == 8 and report["channel_pruning"]["channels_after"] == 6
        assert report["int8_bytes"] < report["fp32_bytes"] and report["quality"]["accuracy_drop_pp"] <= 10.0
    with pytest.raises(ConversionError, match="--prune-channels 1.5"):
        convert_onnx(assets.fp32_v2, assets.calib, tmp_path / "x.ewb", options=ConvertOptions(prune_channels=1.5))
