"""The store, the budget and the engine on a real onnxruntime model."""

import os

import numpy as np
import pytest

from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.errors import BudgetError, BundleError, InferenceError, ModelNotFound, SelfTestError, VersionError
from agent.signing import load_public_key
from agent.store import Store

from conftest import repack


def _install(store, bundle, pub):
    return store.install(open_bundle(bundle, [load_public_key(pub)]))


def test_store_switches_current_atomically_and_refuses_rollback(assets, tmp_path):
    store = Store(tmp_path, keep_versions=1)
    _install(store, assets.v1, assets.pub)
    store.set_current("digits", 1)
    assert store.current("digits")[0] == 1 and store.names() == ["digits"]
    _install(store, assets.v2, assets.pub)
    assert store.current("digits")[0] == 1  # installed is not current until switched
    store.set_current("digits", 2)
    assert store.current("digits")[0] == 2
    assert os.readlink(tmp_path / "models" / "digits" / "current") == "v2"
    assert store.prune("digits") == [1]
    with pytest.raises(VersionError, match="not newer"):
        _install(store, assets.v1, assets.pub)


def test_store_clears_leftovers_of_an_interrupted_install(assets, tmp_path):
    store = Store(tmp_path)
    _install(store, assets.v1, assets.pub)
    store.set_current("digits", 1)
    (tmp_path / "models" / "digits" / ".v2.half").mkdir()
    (tmp_path / "models" / "digits" / ".current.123").symlink_to("v1")
    store = Store(tmp_path)
    assert sorted(p.name for p in (tmp_path / "models" / "digits").iterdir()) == ["current", "v1"]
    assert store.current("digits")[0] == 1


@pytest.fixture
def engine_with_v1(assets, tmp_path):
    store = Store(tmp_path)
    folder = _install(store, assets.v1, assets.pub)
    engine = Engine(Budget(budget_mb=2048, reserve_mb=0))
    model = engine.load(folder)
    engine.activate(model)
    yield engine, model
    engine.close()


def test_engine_serves_correct_predictions_and_counts_them(engine_with_v1, assets):
    engine, model = engine_with_v1
    x, y = assets.eval_inputs(64), assets.eval_labels(64)
    _, out = engine.infer_arrays("digits", {"input": x})
    assert out["logits"].shape == (64, 10)
    assert (out["logits"].argmax(1) == y).mean() >= 0.85
    snap = model.snapshot()
    assert snap.requests == 1 and snap.errors == 0 and snap.p50_ms > 0 and snap.p99_ms >= snap.p50_ms
    assert snap.mean_batch == 64.0 and snap.inflight == 0


def test_a_model_reports_the_execution_providers_it_really_runs_on(assets, tmp_path, caplog):
    """inference.providers asking for TensorRT on a CPU-only onnxruntime: the model runs on the
    CPU, its state says so, and the log names what was asked for and is missing."""
    store = Store(tmp_path)
    engine = Engine(Budget(budget_mb=2048, reserve_mb=0),
                    providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    try:
        with caplog.at_level("WARNING", logger="agent.engine"):
            model = engine.load(_install(store, assets.v1, assets.pub))
        assert model.info().providers == ["CPUExecutionProvider"]
        warned = [r.getMessage() for r in caplog.records if "inference.providers" in r.getMessage()]
        assert warned == ["digits v1 runs on CPUExecutionProvider: inference.providers asks for "
                          "TensorrtExecutionProvider, CUDAExecutionProvider, which this onnxruntime build does not "
                          "have or could not start (install the onnxruntime build for this board's CUDA/JetPack)"]
    finally:
        engine.close()


def test_no_request_fails_while_models_are_swapped_under_load(assets, tmp_path):
    """Four threads infer without pause while the model is replaced 30 times: not one error.
    Each request is a batch of 512 rows, so runs take long enough for swaps to land mid-request."""
    import threading

    store = Store(tmp_path)
    folders = [_install(store, b, assets.pub) for b in (assets.v1, assets.v2)]
    engine = Engine(Budget(4096, reserve_mb=0))
    engine.activate(engine.load(folders[0]))
    x = np.repeat(assets.eval_inputs(4), 128, axis=0)
    stop, errors, served = threading.Event(), [], {1: 0, 2: 0}

    def client():
        while not stop.is_set():
            try:
                model, out = engine.infer_arrays("digits", {"input": x})
                assert out["logits"].shape == (512, 10)
                served[model.version] += 1
            except Exception as exc:  # any failure is what this test exists to catch
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(30):
        old = engine.activate(engine.load(folders[(i + 1) % 2]))
        old.close()
    stop.set()
    for t in threads:
        t.join()
    engine.close()
    assert errors == []
    assert served[1] > 0 and served[2] > 0


def test_self_test_passes_on_the_reference_data(engine_with_v1):
    _, model = engine_with_v1
    result = model.self_test()
    assert result["top1_agreement"] == 1.0 and result["max_abs_err"] <= result["atol"]


@pytest.mark.parametrize("feeds, fragment", [
    ({"input": np.zeros((1, 1, 8, 8), np.float64)}, "dtype float64"),
    ({"input": np.zeros((1, 8, 8), np.float32)}, "shape [1, 8, 8]"),
    ({"input": np.zeros((1, 1, 9, 8), np.float32)}, "shape [1, 1, 9, 8]"),
    ({"input": np.full((1, 1, 8, 8), np.nan, np.float32)}, "NaN"),
    ({"a": np.zeros((1, 1, 8, 8), np.float32), "b": np.zeros(1, np.float32)}, "takes inputs"),
])
def test_bad_requests_fail_alone_and_are_counted(engine_with_v1, feeds, fragment):
    engine, model = engine_with_v1
    with pytest.raises(InferenceError) as err:
        engine.infer_arrays("digits", feeds)
    assert fragment in str(err.value)
    assert model.stats.snapshot(1).errors == 1
    _, out = engine.infer_arrays("digits", {"input": np.zeros((2, 1, 8, 8), np.float32)})  # still serving
    assert out["logits"].shape == (2, 10)


def test_unknown_model_names_the_ones_serving(engine_with_v1):
    engine, _ = engine_with_v1
    with pytest.raises(ModelNotFound, match="serving: digits"):
        engine.infer_arrays("cats", {})


def test_budget_refusal_says_by_how_much(assets, tmp_path):
    store = Store(tmp_path)
    folder = _install(store, assets.v1, assets.pub)
    budget = Budget(budget_mb=1, reserve_mb=0)  # below any Python process
    engine = Engine(budget)
    with pytest.raises(BudgetError) as err:
        engine.load(folder)
    msg = str(err.value)
    assert "needs" in msg and "short by" in msg and "raise memory.budget_mb" in msg
    assert engine.models() == []


def test_admission_counts_a_whole_worker_the_runtime_and_the_model():
    budget = Budget(4096)
    engine = Engine(budget)
    engine.worker_base_mb = 30.0
    budget.budget_mb = budget.used_mb() + 30 + 40 + 10 + 20  # room for it, with 20 MB to spare
    engine.admit_declared("m", "onnxruntime", load_mb=10, runtime_mb=40)
    budget.budget_mb -= 25  # now 5 MB short
    with pytest.raises(BudgetError, match=r"needs 80.0 MB.*short by [4-6]\.\d MB"):
        engine.admit_declared("m", "onnxruntime", load_mb=10, runtime_mb=40)


def test_a_model_newer_than_this_onnxruntime_is_refused_at_load_with_the_fix(assets, tmp_path):
    """The worker's load error reaches the installer whole: what the board has, what it lacks."""
    import onnx
    import onnxruntime

    def from_the_future(path):
        model = onnx.load(str(path))
        model.ir_version = 99
        onnx.save(model, str(path))
    bad = repack(assets.v1, tmp_path / "future.ewb", assets.key, model_edit=from_the_future)
    with pytest.raises(BundleError) as caught:
        Engine(Budget(2048)).load(_install(Store(tmp_path / "store"), bad, assets.pub))
    assert f"this board's onnxruntime {onnxruntime.__version__} is older than" in caught.value.message
    assert "Unsupported model IR version: 99" in caught.value.message
    assert caught.value.fix.startswith("upgrade onnxruntime on the board")


def test_self_test_catches_a_model_that_does_not_match_its_reference(assets, tmp_path):
    def corrupt(arrays):
        arrays["expected.logits"] = arrays["expected.logits"][::-1].copy()
    bad = repack(assets.v1, tmp_path / "bad.ewb", assets.key, reference_edit=corrupt)
    store = Store(tmp_path / "store")
    model = Engine(Budget(2048)).load(_install(store, bad, assets.pub))
    with pytest.raises(SelfTestError, match="failed its self-test"):
        model.self_test()

