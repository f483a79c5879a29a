"""MQTT pipelines declared in the config: a message on an input topic runs a model and the
answer appears on the output topic, as JSON or binary frames, against a real Mosquitto."""

import json

import numpy as np
import pytest

from agent import wire
from agent.config import load_config
from agent.errors import ConfigError

from mqttkit import RawClient, RunningAgent, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def piped(broker, assets, tmp_path):
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-pipe", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "models": {"digits": {"mode": "batched", "max_batch": 8, "max_delay_ms": 5}},
                       "pipelines": [
                           {"input_topic": "camera/+/digits", "model": "digits", "output_topic": "results/digits"},
                           {"input_topic": "camera/raw", "model": "digits", "output_topic": "results/raw",
                            "format": "binary"},
                           {"input_topic": "sensor/raw", "model": "digits", "output_topic": "results/sensor",
                            "format": "raw"}]},
                      install=[assets.v1])
    wait_for(ra.agent.connected.is_set, what="agent connected")
    raw = RawClient(broker.port)
    raw.subscribe("results/#")
    yield ra, raw
    raw.close()
    ra.stop()


def _answers(raw, topic, n):
    got = []
    wait_for(lambda: got.extend(m for m in raw.collect(lambda t: t == topic, 0.2)) or len(got) >= n,
             what=f"{n} answer(s) on {topic}")
    return got


def test_json_messages_run_the_model_and_answer_on_the_output_topic(piped, assets):
    ra, raw = piped
    x = assets.eval_inputs(6)
    want = ra.agent.infer("digits", {"input": x})["logits"]
    for i in range(6):  # one sample per message, from two cameras: the batched model joins them
        raw.publish(f"camera/{i % 2}/digits", json.dumps({"inputs": {"input": x[i:i + 1].tolist()}}).encode())
    answers = [json.loads(m.payload) for m in _answers(raw, "results/digits", 6)]
    assert all(a["status"] == "ok" and a["model"] == "digits" and a["version"] == 1 for a in answers)
    got = sorted(np.array(a["outputs"]["logits"])[0].argmax() for a in answers)
    assert got == sorted(want.argmax(1).tolist())
    raw.publish("camera/0/digits", json.dumps(x[:2].tolist()).encode())  # a bare list for a one-input model
    bare = json.loads(_answers(raw, "results/digits", 1)[0].payload)
    np.testing.assert_allclose(bare["outputs"]["logits"], want[:2], atol=1e-5)


def test_binary_frames_in_and_out(piped, assets):
    ra, raw = piped
    x = assets.eval_inputs(3)
    raw.publish("camera/raw", wire.pack_tensors({"input": x}, v=1))
    header, outputs = wire.unpack_tensors(_answers(raw, "results/raw", 1)[0].payload)
    assert header["status"] == "ok"
    np.testing.assert_allclose(outputs["logits"], ra.agent.infer("digits", {"input": x})["logits"], atol=1e-5)


@pytest.mark.parametrize("payload, fragment", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"inputs": {"image": [[1.0]]}}).encode(), "has no input 'image'"),
    (json.dumps({"inputs": {"input": [[1.0, 2.0], [3.0]]}}).encode(), "not a rectangular list"),
    (json.dumps({"inputs": {"input": [[[[1.0] * 4] * 8]]}}).encode(), "shape"),
])
def test_a_bad_message_gets_an_error_answer_and_the_pipeline_goes_on(piped, assets, payload, fragment):
    ra, raw = piped
    raw.publish("camera/0/digits", payload)
    answer = json.loads(_answers(raw, "results/digits", 1)[0].payload)
    assert answer["status"] == "error" and fragment in answer["error"], answer
    raw.publish("camera/0/digits", json.dumps({"inputs": {"input": assets.eval_inputs(1).tolist()}}).encode())
    assert json.loads(_answers(raw, "results/digits", 1)[0].payload)["status"] == "ok"


def test_a_pipeline_that_would_eat_its_own_answers_is_refused_at_start(assets):
    with pytest.raises(ConfigError, match="would take a pipeline's own answers"):
        load_config(None, {"trust.keys": [str(assets.pub)], "pipelines": [
            {"input_topic": "results/#", "model": "digits", "output_topic": "results/digits"}]})


def test_a_stateful_models_chunks_run_in_the_order_they_came(broker, assets, rnn_bundle, tmp_path):
    """A microphone's frames, one per message, on an agent with 4 inference threads: each
    stream's chunks meet its state in arrival order (agent/lanes.py), so the answers equal
    the whole sequence run at once, and a local app continues the same stream."""
    import onnxruntime as ort

    from agent.client import LocalClient

    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-kws", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "inference.workers": 4,
                       "pipelines": [{"input_topic": "mic/+/frames", "model": "kws", "output_topic": "results/kws"}]},
                      install=[rnn_bundle])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("results/#")
        frames = np.random.default_rng(5).random((48, 1, 8), dtype=np.float32)
        session = ort.InferenceSession(str(next((store / "models" / "kws").glob("v1")) / "model.onnx"))
        whole, _ = session.run(None, {"frames": frames, "h": np.zeros((1, 1, 16), np.float32)})
        sent = [raw.client.publish("mic/0/frames", json.dumps({"stream": "mic-0", "inputs": {
            "frames": frames[i:i + 1].tolist()}}).encode(), qos=1) for i in range(40)]  # back to back
        for info in sent:
            info.wait_for_publish(5)
        answers = [json.loads(m.payload) for m in _answers(raw, "results/kws", 40)]
        assert all(a["status"] == "ok" for a in answers), answers[0]
        got = np.concatenate([np.array(a["outputs"]["scores"], np.float32) for a in answers])
        np.testing.assert_allclose(got, whole[:40], atol=1e-5)
        with LocalClient(str(store / "agent.sock")) as client:  # the same stream, on the worker's socket
            rest = client.infer("kws", {"frames": frames[40:]}, stream="mic-0")["scores"]
        np.testing.assert_allclose(rest, whole[40:], atol=1e-5)
        raw.publish("mic/0/frames", json.dumps({"stream": 7, "inputs": {"frames": frames[:1].tolist()}}).encode())
        bad = json.loads(_answers(raw, "results/kws", 1)[0].payload)
        assert bad["status"] == "error" and "stream must be a string" in bad["error"]
    finally:
        raw.close()
        ra.stop()


def test_raw_payloads_are_the_inputs_bytes_and_their_rows_are_read_off_the_length(piped, assets):
    """format: raw, for a microcontroller that sends a buffer: no JSON, no framing."""
    ra, raw = piped
    x = assets.eval_inputs(3)
    want = ra.agent.infer("digits", {"input": x})["logits"]
    raw.publish("sensor/raw", x.astype("<f4").tobytes())
    a = json.loads(_answers(raw, "results/sensor", 1)[0].payload)
    assert a["status"] == "ok", a
    np.testing.assert_allclose(a["outputs"]["logits"], want, atol=1e-5)
    raw.publish("sensor/raw", x.tobytes()[:-4])
    bad = json.loads(_answers(raw, "results/sensor", 1)[0].payload)
    assert bad["status"] == "error" and "is not a whole number of 'input' rows" in bad["error"]
    assert "256 bytes each" in bad["error"]  # 1 x 8 x 8 float32


def test_each_topic_can_be_its_own_stream(broker, assets, rnn_bundle, tmp_path):
    """stream_from_topic: two microphones publishing raw frames to mic/<room>/frames keep two
    independent streams, each equal to its whole sequence run at once."""
    import onnxruntime as ort

    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-mics", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0,
                       "pipelines": [{"input_topic": "mic/+/frames", "model": "kws", "output_topic": "results/kws",
                                      "format": "raw", "stream_from_topic": True}]},
                      install=[rnn_bundle])
    raw = RawClient(broker.port)
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        raw.subscribe("results/#")
        rooms = {room: np.random.default_rng(seed).random((10, 1, 8), dtype=np.float32)
                 for seed, room in enumerate(("kitchen", "hall"))}
        session = ort.InferenceSession(str(next((store / "models" / "kws").glob("v1")) / "model.onnx"))
        for i in range(10):  # interleaved, one frame per message, in arrival order
            for room, frames in rooms.items():
                raw.publish(f"mic/{room}/frames", frames[i:i + 1].tobytes())
        answers = [json.loads(m.payload) for m in _answers(raw, "results/kws", 20)]
        assert all(a["status"] == "ok" for a in answers), answers[0]
        for k, (room, frames) in enumerate(rooms.items()):
            whole, _ = session.run(None, {"frames": frames, "h": np.zeros((1, 1, 16), np.float32)})
            got = np.concatenate([np.array(a["outputs"]["scores"], np.float32) for a in answers[k::2]])
            np.testing.assert_allclose(got, whole, atol=1e-5)
    finally:
        raw.close()
        ra.stop()
    with pytest.raises(ConfigError, match="stream_from_topic is for stateful models"):
        load_config(None, {"mqtt.url": "mqtt://127.0.0.1:9", "store.path": str(tmp_path), "trust.keys": [str(assets.pub)],
                           "pipelines": [{"input_topic": "a", "model": "m", "output_topic": "b", "format": "image",
                                          "stream_from_topic": True}]})


def test_a_fleet_request_names_its_stream_and_continues_it(broker, assets, rnn_bundle, tmp_path):
    """`edgeward infer --device D --model kws --input f.npy --stream s` (InferHeader.stream):
    chunks sent over MQTT continue one stream, as local calls do."""
    import subprocess
    import sys

    import onnxruntime as ort

    from agent.config import MqttConfig
    from agent.fleet import Fleet

    store = tmp_path / "store"
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-kws-fleet", "store.path": str(store),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 4096, "memory.reserve_mb": 0},
                      install=[rnn_bundle])
    try:
        wait_for(ra.agent.connected.is_set, what="agent connected")
        frames = np.random.default_rng(6).random((9, 1, 8), dtype=np.float32)
        session = ort.InferenceSession(str(next((store / "models" / "kws").glob("v1")) / "model.onnx"))
        whole, _ = session.run(None, {"frames": frames, "h": np.zeros((1, 1, 16), np.float32)})
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            got = [fleet.infer("pi-kws-fleet", "kws", {"frames": frames[lo:lo + 3]}, stream="s")["outputs"]["scores"]
                   for lo in (0, 3)]
            np.testing.assert_allclose(np.concatenate(got), whole[:6], atol=1e-5)
        np.save(tmp_path / "rest.npy", frames[6:])
        r = subprocess.run([sys.executable, "-m", "agent.cli", "infer", "--device", "pi-kws-fleet", "--model", "kws",
                            "--input", str(tmp_path / "rest.npy"), "--input-name", "frames", "--stream", "s",
                            "--broker", broker.url, "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(json.loads(r.stdout)["outputs"]["scores"], whole[6:], atol=1e-5)
        r = subprocess.run([sys.executable, "-m", "agent.cli", "infer", "--model", "kws", "--input",
                            str(tmp_path / "rest.npy"), "--stream", "s", "--output", str(tmp_path / "r.jsonl")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--stream is for one request to a device" in r.stderr
    finally:
        ra.stop()
