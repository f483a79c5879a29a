"""Models in worker processes: unloading gives the memory back, a crash or a hang costs one
model's requests, never the agent or another model."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from agent.budget import Budget
from agent.engine import RESTART_MIN_INTERVAL_S, Engine
from agent.errors import BudgetError, InferenceError
from agent.errors import WorkerCrashed
from agent.modelproc import ModelProcess
from agent.store import Store

from test_store_engine import _install


@pytest.fixture
def folders(assets, tmp_path):
    store = Store(tmp_path)
    return [_install(store, b, assets.pub) for b in (assets.v1, assets.v2)]


def test_workers_keep_few_malloc_heaps_unless_the_user_chose(monkeypatch):
    def environ(proc: ModelProcess) -> dict:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)

    proc = ModelProcess()
    try:
        assert environ(proc)["MALLOC_ARENA_MAX"] == "2"
    finally:
        proc.close()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    proc = ModelProcess()
    try:
        assert environ(proc)["MALLOC_ARENA_MAX"] == "4"
    finally:
        proc.close()


def test_unloading_a_model_returns_its_memory(folders, assets):
    budget = Budget(4096, reserve_mb=0)
    engine = Engine(budget)
    # warm the agent's own code paths once, so the measurement sees only the model's memory
    warm = engine.load(folders[0])
    warm.close()
    before = budget.rss_mb()
    model = engine.load(folders[0])
    engine.activate(model)
    model.self_test()
    engine.infer_arrays("digits", {"input": np.repeat(assets.eval_inputs(8), 64, axis=0)})
    loaded = budget.rss_mb()
    engine.unload("digits")
    after = budget.rss_mb()
    assert loaded - before > 20, f"the model's worker should cost memory ({before:.1f} -> {loaded:.1f} MB)"
    assert after <= before * 1.10, f"RSS {before:.1f} MB before the load, {after:.1f} MB after the unload"


def test_the_budget_counts_pages_the_workers_share_once(folders):
    """PSS, not an RSS sum: two workers map the same libpython, numpy and onnxruntime pages,
    and the RSS sum would count those twice (see agent/budget.py)."""
    budget = Budget(4096, reserve_mb=0)
    engine = Engine(budget)
    try:
        for folder in folders[:2]:
            engine.load(folder)
        rss, used = budget.rss_mb(), budget.used_mb()
        assert used < rss - 15, f"PSS {used:.1f} MB against an RSS sum of {rss:.1f} MB"
        assert used > 0.3 * rss  # each process's own pages still count
    finally:
        engine.close()


def test_a_crashed_worker_fails_only_its_requests_and_is_restarted(folders, assets):
    events = []
    engine = Engine(Budget(4096, reserve_mb=0), emit=lambda kind, msg, **kw: events.append(kind))
    x = assets.eval_inputs(2)
    crashing = engine.load(folders[0])
    engine.activate(crashing)
    bystander = engine.load(folders[1])  # another model (v2 under another name) keeps serving
    bystander.manifest.name = "other"
    engine.activate(bystander)
    want = engine.infer_arrays("digits", {"input": x})[1]["logits"]

    def crash_during_a_request():
        """Freeze the worker, let a request reach it, then kill it: a runtime crash mid-request."""
        pid = crashing.proc.pid
        os.kill(pid, signal.SIGSTOP)
        failure = {}

        def call():
            try:
                engine.infer_arrays("digits", {"input": x})
            except InferenceError as exc:
                failure["error"] = exc

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t.join(10)
        return failure.get("error")

    err = crash_during_a_request()
    assert isinstance(err, WorkerCrashed) and err.code == "model_crashed" and "SIGKILL" in str(err)
    assert engine.infer_arrays("other", {"input": x})[1]["logits"].shape == (2, 10)  # unaffected
    got = engine.infer_arrays("digits", {"input": x})[1]["logits"]  # a fresh worker serves it
    np.testing.assert_array_equal(got, want)
    assert events.count("model_restarted") == 1 and events.count("model_crashed") == 1
    crashing = engine.get("digits")
    # a worker that dies again at once is not restarted in a tight loop
    crash_during_a_request()
    with pytest.raises(WorkerCrashed, match="restarting after a crash"):
        engine.infer_arrays("digits", {"input": x})
    time.sleep(RESTART_MIN_INTERVAL_S)
    np.testing.assert_array_equal(engine.infer_arrays("digits", {"input": x})[1]["logits"], want)
    engine.close()


def test_a_hung_model_times_out_for_its_caller_and_others_go_on(folders, assets):
    engine = Engine(Budget(4096, reserve_mb=0), timeout_s=1.0)
    model = engine.load(folders[0])
    engine.activate(model)
    other = engine.load(folders[1])
    other.manifest.name = "other"
    engine.activate(other)
    os.kill(model.proc.pid, signal.SIGSTOP)  # the runtime never returns
    results = {}

    def call_hung():
        try:
            engine.infer_arrays("digits", {"input": assets.eval_inputs(1)})
        except InferenceError as exc:
            results["hung"] = exc

    t = threading.Thread(target=call_hung)
    started = time.monotonic()
    t.start()
    assert engine.infer_arrays("other", {"input": assets.eval_inputs(1)})[1]["logits"].shape == (1, 10)
    t.join(10)
    assert "did not answer" in str(results["hung"]) and time.monotonic() - started < 5
    engine.close()


def test_execution_providers_this_build_lacks_fall_back_to_the_cpu(folders, assets):
    """On a Jetson the config can ask for TensorRT/CUDA; where the onnxruntime build has neither,
    the model still loads, on the CPU, and says so."""
    import onnxruntime

    engine = Engine(Budget(4096, reserve_mb=0), providers=["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                           "NoSuchExecutionProvider"])
    model = engine.load(folders[0])
    have = set(onnxruntime.get_available_providers())
    want = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have] + ["CPUExecutionProvider"]
    assert model.proc.providers == want
    assert model.self_test()["top1_agreement"] == 1.0
    model.close()


def test_idle_models_are_evicted_least_recently_used_first_and_come_back_on_demand(assets, tmp_path):
    from agent.bundle import open_bundle, read_installed_manifest
    from agent.signing import load_public_key

    from conftest import repack

    store = Store(tmp_path / "store")
    folder = {}
    for name in "abc":
        bundle = repack(assets.v1, tmp_path / f"{name}.ewb", assets.key, manifest_edit=lambda m, n=name: setattr(m, "name", n))
        folder[name] = store.install(open_bundle(bundle, [load_public_key(assets.pub)]))
    events = []
    budget = Budget(8192, reserve_mb=0)
    engine = Engine(budget, evict_idle_s=0.05, emit=lambda kind, msg, **kw: events.append((kind, kw.get("model"))))
    x = assets.eval_inputs(2)

    def load_as(name):
        model = engine.load(folder[name])
        engine.activate(model)
        return model

    load_as("a")
    load_as("b")
    manifest = read_installed_manifest(folder["c"])
    cost = engine.worker_base_mb + manifest.memory.runtime_mb + manifest.memory.load_mb  # what loading c is admitted at
    budget.budget_mb = budget.used_mb() + cost - 5  # room for two workers, not three
    time.sleep(0.1)
    engine.infer_arrays("a", {"input": x})  # b is now the least recently used
    time.sleep(0.1)
    load_as("c")
    assert ("model_evicted", "b") in events and sorted(m.name for m in engine.models()) == ["a", "c"]
    assert list(engine.evicted()) == ["b"]
    assert [(i.name, i.version, i.health) for i in engine.evicted_infos()] == [("b", 1, "evicted")]
    # b's next request brings it back (and evicts the least recently used of the others)
    time.sleep(0.1)
    engine.infer_arrays("c", {"input": x})
    out = engine.infer_arrays("b", {"input": x})[1]["logits"]
    assert out.shape == (2, 10) and ("model_reloaded", "b") in events and ("model_evicted", "a") in events
    assert sorted(m.name for m in engine.models()) == ["b", "c"]
    # with eviction off, a load that does not fit is refused and nothing is unloaded
    engine.evict_idle_s = 0
    with pytest.raises(BudgetError, match="short by"):
        engine.load(folder["a"])
    assert sorted(m.name for m in engine.models()) == ["b", "c"]
    engine.close()
