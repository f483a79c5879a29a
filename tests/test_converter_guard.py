"""The converter's guards: the --max-drop search, refusing a quantized model that is worse than
FP32, and the other precisions (dynamic INT8, FP32) served by a real agent engine."""

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.errors import ConversionError
from agent.signing import load_public_key
from agent.store import Store
from converters import guard
from converters.convert import ConvertOptions, convert_onnx


# ------------------------------------------------------------------ the search (unit, with a fake quantizer)

def _fake(drops: dict):
    """A quantizer whose quality loss is looked up by the settings' label (default 0.2)."""
    tried = []

    def try_settings(s):
        tried.append(s.label())
        if drops.get(s.label()) == "fail":
            raise ConversionError("unsupported operator")
        drop = drops.get(s.label(), 0.2)
        return {"accuracy_drop_pp": drop * 100}
    return try_settings, tried


def test_the_search_stops_at_the_first_settings_within_budget():
    fn, tried = _fake({"minmax, per-channel": 0.05, "entropy, per-channel": 0.004})
    s, quality, attempts = guard.search(guard.Settings(), fn, 0.005, ["fc", "conv1"])
    assert s.label() == "entropy, per-channel" and tried == ["minmax, per-channel", "entropy, per-channel"]
    assert [a.drop for a in attempts] == [0.05, 0.004] and quality["accuracy_drop_pp"] == pytest.approx(0.4)


def test_the_search_then_keeps_the_most_helpful_layers_in_float_one_at_a_time():
    fn, tried = _fake({"percentile, per-tensor": 0.03, "percentile, per-tensor, float: conv1": 0.02,
                       "percentile, per-tensor, float: fc": 0.025, "percentile, per-tensor, float: conv1, fc": 0.001,
                       "minmax, per-channel": "fail"})
    s, _, attempts = guard.search(guard.Settings(), fn, 0.005, ["fc", "conv1", "conv2"])
    assert s.exclude == ["conv1", "fc"]
    assert tried[:6] == ["minmax, per-channel", "entropy, per-channel", "percentile, per-channel",
                         "minmax, per-tensor", "entropy, per-tensor", "percentile, per-tensor"]
    assert attempts[0].drop is None and "unsupported" in attempts[0].note


def test_a_budget_that_cannot_be_met_fails_with_every_attempt_listed():
    fn, tried = _fake({})
    with pytest.raises(ConversionError) as err:
        guard.search(guard.Settings(), fn, 0.01, ["fc"], max_float_layers=1)
    text = str(err.value)
    assert "no quantization stays within --max-drop 0.01" in text and "--precision fp32" in text
    assert text.count("20.00 %") == len(tried) == 7  # six settings, then one layer kept in float


def test_the_search_tries_only_the_calibration_methods_the_target_has():
    fn, tried = _fake({})  # a TFLite source: no entropy calibration, so no attempt that can only fail
    with pytest.raises(ConversionError):
        guard.search(guard.Settings(), fn, 0.01, [], methods=("minmax", "percentile"))
    assert tried == ["minmax, per-channel", "percentile, per-channel", "minmax, per-tensor", "percentile, per-tensor"]


def test_dynamic_quantization_searches_only_layers_kept_in_float():
    fn, tried = _fake({"dynamic, float: fc": 0.0})
    s, _, _ = guard.search(guard.Settings(method="dynamic"), fn, 0.0, ["fc"], calibrated=False)
    assert tried == ["dynamic", "dynamic, float: fc"] and s.exclude == ["fc"]


@pytest.mark.parametrize("fp32_b, int8_b, fp32_ms, int8_ms, problem", [
    (1000, 400, 1.0, 0.5, None),
    (1000, 1200, 1.0, 0.5, "larger"),
    (1000, 400, 1.0, 1.3, "slower"),
    (1000, 400, 0.020, 0.027, None),  # 35 % slower but 7 µs: timer noise on a tiny model, not a verdict
    (1024, 1536, 1.0, 2.0, "larger (1.5 kB vs 1.0 kB) and slower"),
])
def test_worse_than_fp32(fp32_b, int8_b, fp32_ms, int8_ms, problem):
    got = guard.worse_than_fp32({"fp32_bytes": fp32_b, "int8_bytes": int8_b},
                                {"fp32": {"p50": fp32_ms}, "int8": {"p50": int8_ms}})
    assert (got is None) if problem is None else (problem in got)


# ------------------------------------------------------------------ real conversions

def _tiny_gemm(tmp_path):
    """A 4 -> 2 linear model: so few weights that Q/DQ bookkeeping outweighs them."""
    from onnx import TensorProto, helper, numpy_helper

    from converters.zoo import _save

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], initializer=[w])
    path = _save(graph, tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32))
    return path, tmp_path / "calib.npz"


def test_a_quantized_model_larger_than_fp32_is_refused_unless_asked(tmp_path, assets):
    model, calib = _tiny_gemm(tmp_path)
    with pytest.raises(ConversionError, match=r"larger .* than its FP32 source.*--precision fp32"):
        convert_onnx(model, calib, tmp_path / "t.ewb", assets.key)
    assert not (tmp_path / "t.ewb").exists()
    report = convert_onnx(model, calib, tmp_path / "t.ewb", assets.key, options=ConvertOptions(allow_worse=True))
    assert "larger" in report["worse_than_fp32"]
    assert "larger" in open_bundle(tmp_path / "t.ewb", verify_signature=False).manifest.quality["shipped_although"]


def _serve(bundle, assets, tmp_path):
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path / "store").install(open_bundle(bundle, [load_public_key(assets.pub)])))
    result = model.self_test()
    engine.activate(model)
    return engine, result


def test_fp32_precision_ships_the_float_model_bit_for_bit(tmp_path, assets):
    import onnxruntime as ort

    report = convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "f.ewb", assets.key, assets.eval,
                          ConvertOptions(name="digits", precision="fp32"))
    assert report["precision"] == "fp32" and report["int8_bytes"] == report["fp32_bytes"]
    engine, selftest = _serve(tmp_path / "f.ewb", assets, tmp_path)
    x = assets.eval_inputs(16)
    want = ort.InferenceSession(str(assets.fp32_v1)).run(None, {"input": x})[0]
    np.testing.assert_array_equal(engine.infer_arrays("digits", {"input": x})[1]["logits"], want)
    assert selftest["max_abs_err"] == 0.0
    engine.close()


def test_dynamic_int8_quantizes_the_weights_and_serves(tmp_path, assets):
    from converters.zoo import build_wide_mlp, write_digits_npz

    model = build_wide_mlp(tmp_path / "wide.onnx", hidden=256)
    calib, evaluation = write_digits_npz(tmp_path, flat=True)
    report = convert_onnx(model, calib, tmp_path / "d.ewb", assets.key, evaluation,
                          ConvertOptions(name="wide", precision="int8-dynamic", max_drop=0.02))
    ops = report["graph"]["ops"]
    assert ops.get("MatMulInteger") == 4 and ops.get("DynamicQuantizeLinear") == 4 and "QuantizeLinear" not in ops
    assert report["int8_vs_fp32"] < 0.3 and report["settings"] == "dynamic"
    assert report["search"]["attempts"][-1]["drop"] <= 0.02
    from converters.cli import render_report

    assert "graph: 4 int8 weight tensors; integer ops: DynamicQuantizeLinear 4, MatMulInteger 4" in \
        render_report(report).splitlines()
    engine, selftest = _serve(tmp_path / "d.ewb", assets, tmp_path)
    assert selftest["top1_agreement"] == 1.0
    engine.close()


def test_max_drop_on_the_digits_cnn_records_its_search_in_the_manifest(tmp_path, assets):
    report = convert_onnx(assets.fp32_v1, assets.calib, tmp_path / "g.ewb", assets.key, assets.eval,
                          ConvertOptions(name="digits", per_channel=False, method="percentile", max_drop=0.005))
    assert report["quality"]["accuracy_drop_pp"] <= 0.5
    search = open_bundle(tmp_path / "g.ewb", verify_signature=False).manifest.quality["accuracy_search"]
    assert search["max_drop"] == 0.005 and search["chosen"] == report["settings"]
    assert search["attempts"][0]["settings"] == "percentile, per-tensor" and search["attempts"][-1]["drop"] <= 0.005


def test_a_quantized_model_whose_answers_are_wrong_is_refused_and_ships_only_when_allowed(assets, tmp_path):
    """Calibration data unlike the real inputs (here a hundredth of their scale) gives ranges the
    real activations overrun: the INT8 model's answers saturate, wrong rather than rounded. The
    converter measures that on the evaluation data and does not ship it; --allow-worse ships it
    with the reason in the report and the manifest."""
    from converters import zoo

    source = zoo.build_mobilenet_like(tmp_path / "m.onnx", size=32)
    calib, evaluation = zoo.write_image_npz(tmp_path, size=32)
    with np.load(calib) as d:
        np.savez(tmp_path / "tiny-calib.npz", image=d["image"] * 0.01)
    with pytest.raises(ConversionError, match="model is broken, so it is not shipped: its answers are off by"):
        convert_onnx(source, tmp_path / "tiny-calib.npz", tmp_path / "m.ewb", assets.key, evaluation,
                     ConvertOptions(name="m"))
    assert not (tmp_path / "m.ewb").exists()
    report = convert_onnx(source, tmp_path / "tiny-calib.npz", tmp_path / "m.ewb", assets.key, evaluation,
                          ConvertOptions(name="m", allow_worse=True))
    assert report["broken"].startswith("its answers are off by")
    bundle = open_bundle(tmp_path / "m.ewb", [load_public_key(assets.pub)])
    assert "its answers are off by" in bundle.manifest.quality["shipped_although"]
    fine = convert_onnx(source, calib, tmp_path / "fine.ewb", assets.key, evaluation, ConvertOptions(name="m"))
    assert fine["broken"] is None


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_layer_behind_a_relu_dead_on_all_the_data_keeps_its_answers(assets, dead_relu_onnx, tmp_path, fmt):
    """A ReLU dead on all the calibration data has a quantization range of zero. onnxruntime's
    quantizer folded it into that range (written as scale 1, zero point 0: negatives pass), so
    the next conv read -100s and answered -1.5 where FP32 answers 2.0; the converter now keeps
    the ReLU in the QDQ model (onnxruntime drops it at run time where that is safe). The TFLite
    writer keeps the next conv's bias exact. Both formats answer as FP32 does."""
    from conftest import DEAD_RELU_BIAS

    source, x = dead_relu_onnx
    np.savez(tmp_path / "calib.npz", x=x[:32])
    np.savez(tmp_path / "eval.npz", x=x[32:])
    report = convert_onnx(source, tmp_path / "calib.npz", tmp_path / "dead.ewb", assets.key, tmp_path / "eval.npz",
                          ConvertOptions(name="dead", format=fmt, allow_worse=True))  # 2 kB of weights: INT8 is larger
    assert report["broken"] is None and report["quality"]["max_abs_err"] <= 0.02, report["quality"]
    engine = Engine(Budget(4096, reserve_mb=0))
    engine.activate(engine.load(Store(tmp_path / "store").install(open_bundle(tmp_path / "dead.ewb",
                                                                                [load_public_key(assets.pub)]))))
    got = next(iter(engine.infer_arrays("dead", {"x": x[32:36]})[1].values()))
    np.testing.assert_allclose(got, np.broadcast_to(DEAD_RELU_BIAS[None, :, None, None], got.shape), atol=0.02)
    engine.close()


def test_broken_is_judged_on_the_mean_error_against_the_outputs_range():
    assert guard.broken({"mean_abs_err": 0.05, "output_range": 1.0}) is None
    assert "off by 0.2 on average" in guard.broken({"mean_abs_err": 0.2, "output_range": 1.0})
    assert "on output scores" in guard.broken({"mean_abs_err": 0.2, "output_range": 1.0, "worst_output": "scores"})
    assert guard.broken({"mean_abs_err": 0.0, "output_range": 0.0}) is None  # a constant, kept
    assert guard.broken({"mean_abs_err": 2.0, "output_range": 0.0})  # a constant, lost


def test_a_sequence_of_classes_is_compared_position_by_position_and_can_be_searched():
    """A recogniser's [N, T, classes] output (OCR's CTC, per-frame keyword spotting): top-1 agreement
    is the share of positions whose class stays, so --max-drop can search for it; a map still cannot."""
    from converters.guard import quality_drop
    from converters.measure import compare

    rng = np.random.default_rng(15)
    ref = rng.standard_normal((4, 10, 6))
    cand = ref.copy()
    cand[0, :3] = -ref[0, :3]  # 3 positions of 40 change class
    q = compare({"seq": ref}, {"seq": cand})
    assert q["top1_agreement"] == pytest.approx(37 / 40) and q["positions"] == 40 and q["samples"] == 4
    assert quality_drop(q) == pytest.approx(3 / 40)
    with pytest.raises(ConversionError, match="--max-drop needs a classifier or a sequence"):
        quality_drop(compare({"map": ref[:, None]}, {"map": cand[:, None]}))
