"""How models take requests: streaming, dynamic micro-batching (dynamic and fixed batch axes),
stateful streams, and the local Unix-socket API with its Python client — on real models in
real worker processes."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from agent import shm
from agent.budget import Budget
from agent.bundle import TensorSpec, open_bundle
from agent.client import LocalClient
from agent.config import ServingConfig
from agent.engine import Engine
from agent.errors import BusyError, InferenceError, ModelNotFound, ProtocolError
from agent.signing import load_public_key
from agent.store import Store

from conftest import fp32_onnx_bundle
from mqttkit import RunningAgent, wait_for


@pytest.fixture(scope="module")
def fixed_batch_bundle(assets, tmp_path_factory):
    """The FP32 digits CNN re-exported with a batch axis fixed at 8, as some exporters write it."""
    import onnx
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("fixed")
    model = onnx.load(str(assets.fp32_v1))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 8
    path = tmp / "digits8.onnx"
    onnx.save(model, str(path))
    x = assets.eval_inputs(8)
    (logits,) = ort.InferenceSession(str(path)).run(None, {model.graph.input[0].name: x})
    name_in, name_out = model.graph.input[0].name, model.graph.output[0].name
    return fp32_onnx_bundle(tmp, assets.key, "digits8", path, [TensorSpec(name_in, "float32", [8, 1, 8, 8])],
                   [TensorSpec(name_out, "float32", [8, 10])], {f"input.{name_in}": x, f"expected.{name_out}": logits})


def _engine(tmp_path, assets, bundles, serving=None, **kw):
    store = Store(tmp_path / "store")
    engine = Engine(Budget(8192, reserve_mb=0), serving_for=lambda name: (serving or {}).get(name, ServingConfig()), **kw)
    for b in bundles:
        model = engine.load(store.install(open_bundle(b, [load_public_key(assets.pub)])))
        model.self_test()
        engine.activate(model)
    return engine


def _concurrently(n, fn):
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


# ------------------------------------------------------------------ dynamic batching

def test_batched_mode_joins_concurrent_requests_and_answers_each_caller_with_its_own_rows(tmp_path, assets):
    x = assets.eval_inputs(32)
    streaming = _engine(tmp_path / "s", assets, [assets.v1])
    want = streaming.infer_arrays("digits", {"input": x})[1]["logits"]
    streaming.close()
    engine = _engine(tmp_path / "b", assets, [assets.v1],
                     {"digits": ServingConfig(mode="batched", max_batch=32, max_delay_ms=20)})
    results, errors = _concurrently(32, lambda i: engine.infer_arrays("digits", {"input": x[i:i + 1]})[1]["logits"])
    assert errors == []
    np.testing.assert_allclose(np.concatenate(results), want, rtol=0, atol=1e-5)  # each caller got its own row
    stats = engine.get("digits").snapshot()
    assert stats.requests == 32 and stats.mean_batch > 4, stats  # they really ran together
    engine.close()


def test_a_fixed_batch_model_is_padded_and_still_answers_single_rows(tmp_path, assets, fixed_batch_bundle):
    x = assets.eval_inputs(8)
    engine = _engine(tmp_path, assets, [fixed_batch_bundle],
                     {"digits8": ServingConfig(mode="batched", max_batch=64, max_delay_ms=5)})
    model = engine.get("digits8")
    name = model.manifest.inputs[0].name
    full = model.infer_arrays({name: x})
    out_name = next(iter(full))
    one = engine.infer_arrays("digits8", {name: x[3:4]})[1][out_name]  # 1 row, padded to 8 inside
    assert one.shape == (1, 10)
    np.testing.assert_allclose(one, full[out_name][3:4], atol=1e-5)
    results, errors = _concurrently(6, lambda i: engine.infer_arrays("digits8", {name: x[i:i + 1]})[1][out_name])
    assert errors == [] and np.allclose(np.concatenate(results), full[out_name][:6], atol=1e-5)
    with pytest.raises(InferenceError, match="16 rows, this model takes 1 to 8 per request"):
        engine.infer_arrays("digits8", {name: np.repeat(x, 2, axis=0)})
    engine.close()


def test_an_image_for_a_fixed_batch_model_is_padded_too(tmp_path, assets, fixed_batch_bundle):
    """An encoded image (camera pipeline, fleet or local request) fills row 0 of a model whose
    batch axis is fixed at 8, and only that row's answer comes back."""
    import io

    from PIL import Image

    from agent.tensors import to_numpy

    engine = _engine(tmp_path, assets, [fixed_batch_bundle])
    model = engine.get("digits8")
    pixels = np.round(assets.eval_inputs(1)[0, 0] * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    _, (out,) = engine.run_image("digits8", png.getvalue(), "unit")
    name = model.manifest.inputs[0].name
    batch = np.zeros((8, 1, 8, 8), np.float32)
    batch[0, 0] = pixels / np.float32(255)
    want = next(iter(model.infer_arrays({name: batch}).values()))[:1]  # streaming mode takes whole batches
    assert out.shape == (1, 10)
    np.testing.assert_allclose(to_numpy(out), want, atol=1e-5)
    engine.close()


def test_a_full_queue_answers_busy_at_once_instead_of_growing(tmp_path, assets):
    engine = _engine(tmp_path, assets, [assets.v1],
                     {"digits": ServingConfig(mode="batched", max_batch=2, max_delay_ms=1, max_queue=4)})
    worker = engine.get("digits").proc.pid
    os.kill(worker, signal.SIGSTOP)  # the model stalls: requests pile up
    threading.Timer(1.5, os.kill, (worker, signal.SIGCONT)).start()
    x = assets.eval_inputs(1)

    def call(i):
        if i >= 6:
            time.sleep(0.5)  # by now 2 rows are in the stalled model and 4 wait in the queue
        return engine.infer_arrays("digits", {"input": x})

    results, errors = _concurrently(10, call)
    busy = [e for e in errors if isinstance(e, BusyError)]
    assert busy and all("rows queued" in str(e) for e in busy)
    assert len(errors) == len(busy)  # everything else was answered once the model went on
    assert engine.infer_arrays("digits", {"input": x})[1]["logits"].shape == (1, 10)
    engine.close()


# ------------------------------------------------------------------ stateful streams

def test_stateful_streams_are_independent_and_do_not_depend_on_chunking(tmp_path, assets, rnn_bundle):
    import onnxruntime as ort

    engine = _engine(tmp_path, assets, [rnn_bundle])
    frames = np.random.default_rng(7).random((30, 1, 8), dtype=np.float32)
    other = np.random.default_rng(8).random((30, 1, 8), dtype=np.float32)
    run = lambda stream, chunk: engine.infer_arrays("kws", {"frames": chunk}, stream=stream)[1]  # noqa: E731

    whole = run("a", frames)
    assert set(whole) == {"scores"}  # the state stays on the board, in the worker
    pieces = []
    for lo, hi in ((0, 7), (7, 8), (8, 21), (21, 30)):   # another chunking, interleaved with a third stream
        pieces.append(run("b", frames[lo:hi])["scores"])
        run("c", other[lo:hi])
    np.testing.assert_allclose(np.concatenate(pieces), whole["scores"], rtol=0, atol=1e-6)
    one_by_one = np.concatenate([run("d", frames[i:i + 1])["scores"] for i in range(30)])
    np.testing.assert_allclose(one_by_one, whole["scores"], rtol=0, atol=1e-6)
    # the same as running the whole sequence in the bare runtime
    session = ort.InferenceSession(str(next((tmp_path / "store" / "models" / "kws").glob("v1")) / "model.onnx"))
    bare, _ = session.run(None, {"frames": frames, "h": np.zeros((1, 1, 16), np.float32)})
    np.testing.assert_allclose(whole["scores"], bare, rtol=0, atol=1e-6)
    # a stream continues where it stopped; a reset starts it over
    assert not np.allclose(run("a", frames[:5])["scores"], whole["scores"][:5])
    assert engine.get("kws").reset_stream("a")
    np.testing.assert_allclose(run("a", frames[:5])["scores"], whole["scores"][:5], atol=1e-6)
    engine.close()


def test_a_restarted_worker_starts_its_streams_over_and_says_so(tmp_path, assets, rnn_bundle):
    """The streams live in the worker: a crash loses them, and the next call on a stream runs
    from zero state as if the stream were new (never on a half-kept state)."""
    events = []
    engine = _engine(tmp_path, assets, [rnn_bundle], emit=lambda kind, msg, **kw: events.append((kind, msg)))
    frames = np.random.default_rng(9).random((6, 1, 8), dtype=np.float32)
    fresh = engine.infer_arrays("kws", {"frames": frames}, stream="a")[1]["scores"]
    assert not np.allclose(engine.infer_arrays("kws", {"frames": frames}, stream="a")[1]["scores"], fresh)
    model = engine.get("kws")
    os.kill(model.proc.pid, signal.SIGKILL)
    model.proc._proc.wait(10)
    np.testing.assert_allclose(engine.infer_arrays("kws", {"frames": frames}, stream="a")[1]["scores"], fresh,
                               atol=1e-6)
    restarted = [msg for kind, msg in events if kind == "model_restarted"]
    assert len(restarted) == 1 and "its streams start over from zero state" in restarted[0]
    engine.close()


def test_a_stream_id_for_a_model_without_state_is_refused(tmp_path, assets):
    engine = _engine(tmp_path, assets, [assets.v1])
    x = assets.eval_inputs(1)
    with pytest.raises(ProtocolError, match="keeps no stream state"):
        engine.infer_arrays("digits", {"input": x}, stream="mic-0")
    assert engine.infer_arrays("digits", {"input": x})[1]["logits"].shape == (1, 10)
    engine.close()


# ------------------------------------------------------------------ the local API and its client

@pytest.fixture
def agent_with_api(assets, tmp_path, rnn_bundle):
    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": "mqtt://127.0.0.1:9", "device.id": "pi-local", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "mqtt.max_payload_kb": 256, "api.max_pending": 64,
                       "models": {"digits": {"mode": "batched", "max_batch": 16, "max_delay_ms": 2}}},
                      install=[assets.v1, rnn_bundle])
    wait_for(lambda: (store / "agent.sock").exists(), what="local API socket")
    yield ra, str(store / "agent.sock")
    ra.stop()


def test_local_clients_get_the_same_answers_as_the_model(agent_with_api, assets):
    ra, path = agent_with_api
    x = assets.eval_inputs(16)
    want = ra.agent.infer("digits", {"input": x})["logits"]
    with LocalClient(path) as client:
        assert {m["name"]: m["mode"] for m in client.models()} == {"digits": "batched", "kws": "stateful"}
        np.testing.assert_allclose(client.infer("digits", {"input": x})["logits"], want, atol=1e-6)
        np.testing.assert_allclose(client.infer("digits", x[:1])["logits"], want[:1], atol=1e-6)  # a bare array
        results, errors = _concurrently(16, lambda i: client.infer("digits", x[i:i + 1])["logits"])
        assert errors == [] and np.allclose(np.concatenate(results), want, atol=1e-6)
        # local apps reach a batched model's worker directly, and it batches them there
        assert client._routes["digits"] == ra.agent.engine.get("digits").direct_socket is not None
        stats = ra.agent.engine.get("digits").snapshot()
        assert stats.requests >= 18 and stats.mean_batch > 1.5, stats
        frames = np.random.default_rng(3).random((10, 1, 8), dtype=np.float32)
        a = client.infer("kws", {"frames": frames}, stream="mic-0")["scores"]
        b = np.concatenate([client.infer("kws", {"frames": frames[:4]}, stream="mic-1")["scores"],
                            client.infer("kws", {"frames": frames[4:]}, stream="mic-1")["scores"]])
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert client.reset("kws", "mic-0") and not client.reset("kws", "never-used")


def test_a_stream_continues_whichever_socket_its_calls_come_through(agent_with_api):
    """A stateful model's worker keeps its streams and takes local apps' calls on its own
    socket: chunks sent alternately there and through the agent (as an MQTT pipeline's are)
    continue one stream, and the worker counted the calls it took directly."""
    ra, path = agent_with_api
    frames = np.random.default_rng(4).random((12, 1, 8), dtype=np.float32)
    model = ra.agent.engine.get("kws")
    before = model.snapshot().requests
    with LocalClient(path) as direct, LocalClient(path, direct=False) as via_agent:
        whole = direct.infer("kws", {"frames": frames}, stream="both")["scores"]
        assert direct._routes["kws"] == model.direct_socket is not None
        pieces = [(direct if i % 2 else via_agent).infer("kws", {"frames": frames[lo:lo + 3]}, stream="mixed")["scores"]
                  for i, lo in enumerate(range(0, 12, 3))]
        np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)
        assert via_agent.reset("kws", "mixed")
        np.testing.assert_allclose(direct.infer("kws", {"frames": frames[:3]}, stream="mixed")["scores"],
                                   whole[:3], atol=1e-6)  # the reset reached the worker's streams
        for client in (direct, via_agent):
            with pytest.raises(ProtocolError, match="stream must be a string of 1 to 256"):
                client.infer("kws", {"frames": frames[:1]}, stream="x" * 257)
            with pytest.raises(ProtocolError, match="keeps no stream state"):
                client.infer("digits", np.zeros((1, 1, 8, 8), np.float32), stream="mic-0")
    assert model.snapshot().requests - before >= 6  # 1 + 2 + 1 direct calls, 2 through the agent
    assert model.snapshot().streams == 2  # "both" and "mixed", kept by the worker; refused calls made none
    assert ra.agent.engine.get("digits").snapshot().streams is None
    # the operator sees them: the status file and `edgeward agent status`
    import subprocess
    import sys

    from agent.status import read_status

    ra.agent.write_status()
    stored = {m["name"]: m.get("streams") for m in read_status(ra.agent.store.root)["models"]}
    assert stored == {"digits": None, "kws": 2}
    r = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "status", "--store", str(ra.agent.store.root)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "STREAMS" in r.stdout, r.stdout + r.stderr
    kws_row = next(line for line in r.stdout.splitlines() if line.startswith("kws "))
    assert kws_row.split()[-1] == "2"


def test_edgeward_bench_measures_a_serving_model_through_the_local_api(agent_with_api):
    """The board-side benchmark: steps of concurrent callers, every request answered, streams reset."""
    import json
    import subprocess
    import sys

    ra, path = agent_with_api

    def bench(*args):
        return subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--socket", path, "--seconds", "0.5",
                               *args], capture_output=True, text=True, timeout=120)

    before = ra.agent.engine.get("digits").snapshot().requests
    r = bench("--model", "digits", "--clients", "1,4", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert (result["model"], result["version"], result["mode"]) == ("digits", 1, "batched")
    assert [s["clients"] for s in result["steps"]] == [1, 4]
    for step in result["steps"]:
        assert step["errors"] == 0 and step["requests"] > 20 and step["rows_per_s"] > 0
        assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
    counted = ra.agent.engine.get("digits").snapshot().requests - before
    assert counted >= sum(s["requests"] for s in result["steps"])  # they went through the model
    r = bench("--model", "kws", "--clients", "2")  # stateful: a stream per caller, the table by default
    assert r.returncode == 0, r.stderr
    assert "kws v1 (stateful)" in r.stdout and "P50 MS" in r.stdout
    with LocalClient(path) as client:
        assert client.reset("kws", "bench-0") is False  # the benchmark's streams were forgotten
    r = bench("--model", "nope")
    assert r.returncode == 2 and "no model named 'nope' is serving; serving: digits, kws" in r.stderr
    r = bench("--model", "digits", "--clients", "0")
    assert r.returncode == 2 and "--clients '0' is not a list of 1 to 256" in r.stderr


def test_edgeward_bench_bare_sets_the_agent_beside_the_bare_runtime(agent_with_api):
    """`--bare`: the same file in the bare runtime, at the batch the agent would run, and both memories."""
    import hashlib
    import json
    import subprocess
    import sys

    ra, path = agent_with_api
    model = ra.agent.engine.get("digits")
    with LocalClient(path) as client:
        digits = next(m for m in client.models() if m["name"] == "digits")
    assert (digits["runtime"], digits["pid"], digits["max_batch"], digits["threads"]) == (
        "onnxruntime", model.proc.pid, 16, ra.agent.engine.threads)
    want = model.manifest.files[model.manifest.model_file].sha256
    assert hashlib.sha256(open(digits["file"], "rb").read()).hexdigest() == want  # the file that serves

    def bench(*args):
        return subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--socket", path, "--seconds", "0.3",
                               "--model", "digits", "--clients", "1,4,32", "--bare", *args],
                              capture_output=True, text=True, timeout=180)

    r = bench("--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [s["bare_batch"] for s in result["steps"]] == [1, 4, 16]  # batched: the callers, up to max_batch
    assert all(s["bare_rows_per_s"] > 0 and s["errors"] == 0 for s in result["steps"])
    bare, mem = result["bare"], result["memory"]
    assert bare["package"].startswith("onnxruntime ") and bare["threads"] == 1 and bare["p50_ms"] > 0
    assert mem["agent"] > 15 and mem["worker"] > 15  # this test's process is the agent here
    assert mem["total"] == pytest.approx(mem["agent"] + mem["worker"], abs=0.11)
    assert mem["ratio"] == pytest.approx(mem["total"] / bare["rss_mb"], rel=0.01)
    r = bench()
    assert r.returncode == 0, r.stderr
    assert "BARE ROWS/S" in r.stdout and "(b=16)" in r.stdout  # the bare batch beside each step
    assert "latency p50 at batch 1: bare" in r.stdout and "memory (RSS): agent" in r.stdout
    assert "batched mode waits up to 2 ms to fill a batch" in r.stdout  # a lone caller's wait is not judged


def test_bad_local_requests_get_an_error_and_harm_nobody(agent_with_api, assets):
    import socket as socketlib
    import struct

    ra, path = agent_with_api
    x = assets.eval_inputs(2)
    with LocalClient(path) as client:
        with pytest.raises(ModelNotFound, match="no model named 'cats'"):
            client.infer("cats", x)
        with pytest.raises(InferenceError, match="shape"):
            client.infer("digits", np.zeros((1, 8, 8), np.float32))
        with pytest.raises(InferenceError, match="dtype float64"):
            client.infer("digits", x.astype(np.float64))
        with pytest.raises(InferenceError, match="NaN or infinity"):
            client.infer("digits", np.full((1, 1, 8, 8), np.nan, np.float32))
        # garbage, and a frame whose header lies about its tensors, from a raw socket
        raw = socketlib.socket(socketlib.AF_UNIX)
        raw.connect(path)
        for junk in (b"not a frame at all", b"EWF1" + struct.pack(">I", 2) + b"{}"):
            raw.sendall(struct.pack(">I", len(junk)) + junk)
            n = struct.unpack(">I", raw.recv(4))[0]
            assert b'"status":"error"' in raw.recv(n)
        raw.sendall(struct.pack(">I", 1 << 30))  # announces a 1 GB message: refused, connection closed
        n = struct.unpack(">I", raw.recv(4))[0]
        assert b"over the" in raw.recv(n)
        raw.close()
        # the agent and its models are fine; concurrent good callers were never affected
        np.testing.assert_allclose(client.infer("digits", x)["logits"], ra.agent.infer("digits", {"input": x})["logits"],
                                   atol=1e-6)
    with pytest.raises(ProtocolError):
        LocalClient(path)._call(b"\x00")


def test_streaming_models_are_served_by_their_worker_directly_with_the_same_checks(assets, tmp_path):
    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": "mqtt://127.0.0.1:9", "device.id": "pi-direct", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "api.max_request_mb": 1}, install=[assets.v1])
    try:
        wait_for(lambda: (store / "agent.sock").exists(), what="local API socket")
        x = assets.eval_inputs(4)
        want = ra.agent.infer("digits", {"input": x})["logits"]
        model = ra.agent.engine.get("digits")
        before = model.snapshot().requests
        with LocalClient(str(store / "agent.sock")) as client:
            for _ in range(5):
                np.testing.assert_allclose(client.infer("digits", x)["logits"], want, atol=1e-6)
            route = client._routes["digits"]
            assert route == model.direct_socket and route.startswith(f"{store}/agent.sock.d/")
            assert model.snapshot().requests == before + 5  # counted by the worker, reported by the agent
            with pytest.raises(InferenceError, match="shape"):
                client.infer("digits", np.zeros((1, 8, 8), np.float32))
            with pytest.raises(InferenceError, match="NaN or infinity"):
                client.infer("digits", np.full((1, 1, 8, 8), np.inf, np.float32))
            big = np.zeros((5000, 1, 8, 8), np.float32)  # 1.3 MB, over api.max_request_mb: 1
            with pytest.raises(ProtocolError, match="over the 1048576-byte limit"):
                client.infer("digits", big)  # the worker's own socket
            with LocalClient(str(store / "agent.sock"), direct=False) as via_agent:
                with pytest.raises(ProtocolError, match="over the 1048576-byte limit"):
                    via_agent.infer("digits", big)
                assert via_agent.infer("digits", big[:4000])["logits"].shape == (4000, 10)
            # a large request to the worker travels in shared memory (agent/shm.py), with the same answer
            rows = np.tile(x, (1000, 1, 1, 1))  # 1,024,000 bytes: the region is api.max_request_mb exactly
            np.testing.assert_allclose(client.infer("digits", rows)["logits"], np.tile(want, (1000, 1)), atol=1e-6)
            assert isinstance(client._regions()[(route, "requests")], shm.Region)
            with pytest.raises(InferenceError, match="NaN or infinity"):  # checked there as inline
                client.infer("digits", np.where(rows == rows.max(), np.nan, rows))
            # the worker dies: the client falls back to the agent, which starts a fresh worker
            os.kill(model.proc.pid, signal.SIGKILL)
            wait_for(lambda: not model.proc.alive() or model.proc._proc.poll() is not None, what="worker gone")
            np.testing.assert_allclose(client.infer("digits", x)["logits"], want, atol=1e-6)
            np.testing.assert_allclose(client.infer("digits", x)["logits"], want, atol=1e-6)
            assert client._routes["digits"] not in (None, route)  # the new worker's socket
            assert not os.path.exists(route)
    finally:
        ra.stop()
    assert not (store / "agent.sock.d").exists()


def test_an_offline_batch_job_writes_one_line_per_sample_and_nothing_on_failure(agent_with_api, assets, tmp_path):
    import json
    import subprocess
    import sys

    ra, path = agent_with_api
    x = assets.eval_inputs(16)
    data = tmp_path / "samples"
    (data / "more").mkdir(parents=True)
    np.save(data / "a.npy", x[:10])
    np.save(data / "more" / "b.npy", x[10])           # one sample without its batch axis
    np.savez(data / "more" / "c.npz", input=x[11:16])
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "agent.cli", "infer", "--model", "digits", "--input", str(data), "--batch", "4",
           "--output", str(out), "--socket", path]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "16 samples through digits v1" in r.stdout and "16/16 samples" in r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = ra.agent.infer("digits", {"input": x})["logits"].argmax(1)
    order = np.concatenate([np.arange(10), [10], np.arange(11, 16)])
    assert [rec["top1"] for rec in lines] == want[order].tolist()
    assert lines[10]["source"].endswith("b.npy") and lines[10]["index"] == 0 and len(lines[0]["outputs"]["logits"]) == 10
    # a file the model cannot take: a one-line error, no results file, no temporary left behind
    np.save(data / "z-bad.npy", np.zeros((2, 3), np.float32))
    out2 = tmp_path / "results2.jsonl"
    r = subprocess.run(cmd[:-3] + [str(out2), "--socket", path], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "shape" in r.stderr and len(r.stderr.strip().splitlines()[-1]) < 300
    assert sorted(p.name for p in tmp_path.iterdir() if "results2" in p.name) == []


def test_a_batch_job_sends_a_fixed_batch_model_its_own_batch_size_and_pads_the_last(tmp_path):
    """A model written for batches of a fixed size (a Keras transformer converted for batches of
    one) takes that many rows a request and no other number: the job cuts the samples so, pads a
    short last batch with copies of its last sample, and names only the real samples."""
    from agent.batchjob import _batches, fixed_batch, padded

    inputs = [{"name": "input", "shape": [4, 3], "dtype": "float32"}]
    assert fixed_batch(inputs) == 4
    assert fixed_batch([{"name": "input", "shape": [-1, 3], "dtype": "float32"}]) is None  # a free batch
    assert fixed_batch([{"name": "input", "shape": [5], "dtype": "float32"}]) is None      # no batch axis
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "a.npy", x)
    got = list(padded(_batches([tmp_path / "a.npy"], inputs, 4), 4))
    assert [len(sources) for sources, _ in got] == [4, 4, 2]
    assert all(feeds["input"].shape == (4, 3) for _, feeds in got)
    last_sources, last = got[-1]
    assert [i for _, i in last_sources] == [8, 9]
    np.testing.assert_array_equal(last["input"], x[[8, 9, 9, 9]])
