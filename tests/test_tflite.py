"""The TFLite backend on a real .tflite model (written with LiteRT's own schema, no TensorFlow):
loaded in a worker, dynamic batch axis, self-test, and served like any other model.

Runs with whichever TFLite package is installed: ai-edge-litert in the main environment,
tflite-runtime 2.14 (numpy < 2) in the second one (scripts/test-oldest-board.sh)."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent import runtimes
from agent.budget import Budget
from agent.bundle import Manifest, MemoryCost, SelfTest, TensorSpec, open_bundle, write_bundle
from agent.config import ServingConfig
from agent.engine import Engine
from agent.errors import InferenceError
from agent.signing import generate_keypair, load_private_key, load_public_key
from agent.store import Store

MLP_INPUT, OUTPUT_NAME = "features", "logits"  # as converters.zoo.build_tflite_mlp names them
# the environment that tests tflite-runtime 2.14 has no LiteRT schema to write a model with:
# scripts/test-oldest-board.sh writes it in the main environment and passes the folder here
FIXTURE = os.environ.get("EDGEWARD_TFLITE_FIXTURE")
EXPECT_PACKAGE = os.environ.get("EDGEWARD_EXPECT_TFLITE")  # e.g. tflite_runtime: that one must serve


def _reference(w, x):
    return np.maximum(x @ w["w1"].T + w["b1"], 0) @ w["w2"].T + w["b2"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    key, pub, _ = generate_keypair(tmp_path_factory.mktemp("keys") / "signing")
    return key, pub


@pytest.fixture(scope="module")
def tflite_bundle(keys, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tflite")
    if FIXTURE:
        path = Path(FIXTURE) / "mlp.tflite"
        with np.load(Path(FIXTURE) / "weights.npz") as w:
            weights = {k: w[k] for k in w.files}
    else:
        from converters.zoo import build_tflite_mlp

        path, weights = build_tflite_mlp(tmp / "mlp.tflite")
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    np.savez(tmp / "reference.npz", **{f"input.{MLP_INPUT}": x, f"expected.{OUTPUT_NAME}": _reference(weights, x)})
    m = Manifest(name="mlp", version=1, format="tflite", model_file="model.tflite", runtime="tflite",
                 precision="fp32", inputs=[TensorSpec(MLP_INPUT, "float32", [-1, 64])],
                 outputs=[TensorSpec(OUTPUT_NAME, "float32", [-1, 10])], selftest=SelfTest(atol=1e-4),
                 memory=MemoryCost(load_mb=6.0, runtime_mb=4.0))
    bundle = write_bundle(tmp / "mlp.ewb", m, {"model.tflite": path, "reference.npz": tmp / "reference.npz"},
                          load_private_key(keys[0]))
    return bundle, weights


def test_a_tflite_runtime_is_found():
    assert "tflite" in runtimes.available()


def test_a_tflite_model_serves_in_its_worker_with_any_batch_size(keys, tmp_path, tflite_bundle):
    bundle, weights = tflite_bundle
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path).install(open_bundle(bundle, [load_public_key(keys[1])])))
    assert model.self_test()["max_abs_err"] < 1e-4
    engine.activate(model)
    worker, _ = model.proc.call({"op": "inspect"})
    assert worker["runtime"] == "tflite" and ({"ai_edge_litert", "tflite_runtime"} & set(worker["modules"]))
    if EXPECT_PACKAGE:
        assert EXPECT_PACKAGE in worker["modules"]
    rng = np.random.default_rng(1)
    for n in (1, 5, 32, 1):  # the interpreter is resized to each batch
        x = rng.random((n, 64), dtype=np.float32)
        out = engine.infer_arrays("mlp", {MLP_INPUT: x})[1][OUTPUT_NAME]
        np.testing.assert_allclose(out, _reference(weights, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceError, match="shape"):
        engine.infer_arrays("mlp", {MLP_INPUT: np.zeros((1, 63), np.float32)})
    with pytest.raises(InferenceError, match="NaN or infinity"):
        engine.infer_arrays("mlp", {MLP_INPUT: np.full((1, 64), np.nan, np.float32)})
    engine.close()


@pytest.mark.parametrize("copies", [1, 2])
def test_runs_borrow_one_of_the_runtimes_copies_and_each_caller_gets_its_own_answer(tflite_bundle, tmp_path,
                                                                                    monkeypatch, copies):
    """An Interpreter must not run from two threads; copies let two batches run at once."""
    from agent.runtimes import tflite

    bundle, weights = tflite_bundle
    path = _model_file(bundle, tmp_path)
    running, most, lock = [0], [0], threading.Lock()
    real_run = tflite._Copy.run

    def counted(self, feeds):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)  # long enough for the other callers to ask for a copy meanwhile
        try:
            return real_run(self, feeds)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(tflite._Copy, "run", counted)
    rt = runtimes.open_model("tflite", str(path), copies=copies)
    errors = []

    def caller(i):
        x = np.random.default_rng(i).random((i % 3 + 1, 64), dtype=np.float32)
        for _ in range(5):
            try:
                got = rt.run({MLP_INPUT: x})[OUTPUT_NAME]
                np.testing.assert_allclose(got, _reference(weights, x), rtol=1e-5, atol=1e-5)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rt.close()
    assert not errors
    assert most[0] == copies


def test_a_batched_tflite_model_gets_one_interpreter_per_batch_in_flight(keys, tmp_path, tflite_bundle):
    """...and its declared load cost is admitted once per copy."""
    bundle, weights = tflite_bundle
    serving = ServingConfig(mode="batched", max_batch=8, batches_in_flight=2)
    budget = Budget(4096, reserve_mb=0)
    costs = []
    real_admit = budget.admit
    budget.admit = lambda name, cost: costs.append(cost) or real_admit(name, cost)
    engine = Engine(budget, serving_for=lambda name: serving)
    engine.direct_dir = str(tmp_path / "direct")
    os.makedirs(engine.direct_dir)
    folder = Store(tmp_path / "store").install(open_bundle(bundle, [load_public_key(keys[1])]))
    base_before = engine.worker_base_mb  # a guess until the first worker has measured it
    model = engine.load(folder)
    try:
        worker, _ = model.proc.call({"op": "inspect"})
        assert worker["copies"] == 2
        load_mb = model.manifest.memory.load_mb
        serving.mode = "streaming"  # one interpreter: the declared load cost once
        engine.admit_declared("mlp", "tflite", load_mb, model.manifest.memory.runtime_mb)
        assert load_mb > 0
        assert costs[0] - costs[1] - (base_before - engine.worker_base_mb) == pytest.approx(load_mb)
        assert model.self_test()["max_abs_err"] < 1e-4
    finally:
        model.close()
        engine.close()


def test_only_batched_tflite_models_asked_for_more_batches_in_flight_get_copies():
    assert runtimes.copies_for("tflite", batched=True, in_flight=0) == 1  # the default: memory first
    assert runtimes.copies_for("tflite", batched=True, in_flight=3) == 3
    assert runtimes.copies_for("tflite", batched=False, in_flight=3) == 1  # streaming runs one call at a time
    assert runtimes.copies_for("onnxruntime", batched=True, in_flight=3) == 1  # a session runs many at once


def _model_file(bundle: Path, tmp_path: Path) -> Path:
    import tarfile

    with tarfile.open(bundle) as tar:
        out = tmp_path / "model.tflite"
        out.write_bytes(tar.extractfile("model.tflite").read())
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Bundles converted by edgeward (digits CNN with float and int8 I/O, a depthwise CNN, a Keras CNN,
    SqueezeNet- and MobileNetV3-style CNNs, a DBNet-style text detector, a TRANSPOSE_CONV, a CNN of
    YOLOv8's parts, a YOLOv8 head with its box decoding, a small transformer from ONNX and one from
    Keras, an unrolled GRU)."""
    if FIXTURE:
        return Path(FIXTURE) / "converted"
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tflitekit import build

    return build(tmp_path_factory.mktemp("converted"))


@pytest.mark.parametrize("stem", ["digits-int8", "digits-int8io", "mobilenet-int8", "keras-int8", "fire-int8", "mv3-int8",
                                  "det-int8", "strip-int8", "c2f-int8", "yolo-int8", "transformer-int8",
                                  "keras-transformer-int8", "ssd-int8", "yolo-nms-int8", "gru-int8"])
def test_converted_int8_bundles_pass_their_self_test_and_match_litert(converted, stem, tmp_path):
    """The converter's INT8 .tflite files run in this runtime (tflite-runtime 2.14 or ai-edge-litert):
    self-test passes, and outputs equal what ai-edge-litert gave to a few quantization steps (the
    runtimes' int8 kernels round differently, and the differences add up over a deep network)."""
    pub = load_public_key(converted / "signing.pub")
    engine = Engine(Budget(4096, reserve_mb=0))
    model = engine.load(Store(tmp_path).install(open_bundle(converted / f"{stem}.ewb", [pub])))
    result = model.self_test()
    assert result["max_abs_err"] <= model.manifest.selftest.atol
    engine.activate(model)
    if EXPECT_PACKAGE:
        worker, _ = model.proc.call({"op": "inspect"})
        assert EXPECT_PACKAGE in worker["modules"]
    if stem in ("ssd-int8", "yolo-nms-int8"):  # detections, matched as the self-test matches them, an image a request
        from agent.detections import agreement

        with np.load(converted / "converted.npz") as d:
            x, names = d[f"{stem}.input"], [str(n) for n in d[f"{stem}.detections"]]
            want = {n: d[f"{stem}.out.{n}"] for n in names}
        runs = [engine.infer_arrays(stem, {model.manifest.inputs[0].name: row[None]})[1] for row in x]
        got = {n: np.concatenate([r[n] for r in runs]) for n in names}
        q = agreement(want, got, names)
        assert q["detections_fp32"] >= len(x) and q["detection_agreement"] >= 0.95, q
        assert q["matched_score_max_err"] <= model.manifest.selftest.atol, q
        engine.close()
        return
    with np.load(converted / "converted.npz") as d:
        x, want, step = d[f"{stem}.input"], d[f"{stem}.output"], float(d[f"{stem}.step"])
    name = model.manifest.inputs[0].name
    fixed = model.manifest.inputs[0].shape[0]  # a model for batches of one (a TRANSPOSE_CONV) takes rows one by one
    step_rows = fixed if fixed > 0 else len(x)
    out = np.concatenate([next(iter(engine.infer_arrays(stem, {name: x[i:i + step_rows]})[1].values()))
                          for i in range(0, len(x), step_rows)])
    assert out.dtype == want.dtype
    if model.manifest.outputs[0].dtype == "int8":
        step = 1.0  # int8 outputs differ in whole steps
    diff = np.abs(out.astype(np.float64) - want.astype(np.float64))
    steps = diff / step
    assert steps.mean() <= 2.0, steps.mean()
    if out.ndim == 2:  # a classifier's scores, and its answers
        assert steps.max() <= 5.01, steps.max()
        assert (out.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    else:  # a detector's map through a sigmoid: one step of its logit is several of its 1/256 output
        assert diff.max() <= model.manifest.selftest.atol, (diff.max(), steps.max())
    engine.close()


def test_the_bare_reference_runs_the_same_file_in_this_tflite_runtime_alone(converted, tmp_path):
    """`edgeward bench --bare` and scripts/bench_agent.py compare the agent with this run: it must
    use the installed TFLite runtime, resize a dynamic batch axis, and hold no agent module."""
    from agent.barebench import run_bare

    path = _model_file(converted / "digits-int8.ewb", tmp_path)
    ref = run_bare("tflite", str(path), threads=1, seconds=0.2, batches=[1, 8])
    want = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
    assert ref["package"] == want.get(EXPECT_PACKAGE, "ai-edge-litert")
    assert ref["foreign"] == []  # no psutil, no agent: their memory would flatter the agent
    assert {b: r["rows"] for b, r in ref["batches"].items()} == {"1": 1, "8": 8}
    assert ref["batches"]["8"]["rows_per_s"] > ref["batches"]["1"]["rows_per_s"] > 0
    assert 0 < ref["p50_ms"] < 50 and ref["rss_mb"] > 15 and ref["batched_rss_mb"] >= ref["rss_mb"] - 1
