"""The agent against a real Mosquitto: presence, inference, deploys good and bad, hostile input, offline start."""

import json

import numpy as np
import onnxruntime
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import protocol, wire
from agent.config import MqttConfig
from agent.devbroker import LocalBroker, free_port
from agent.errors import BundleError, FleetError
from agent.fleet import Fleet

from conftest import flip_byte_in_member, repack
from mqttkit import RawClient, RunningAgent, wait_for

pytestmark = pytest.mark.integration
DEVICE = "pi-test"


def agent_overrides(url, assets, store, **extra):
    return {"mqtt.url": url, "device.id": DEVICE, "store.path": str(store), "trust.keys": [str(assets.pub)],
            "memory.budget_mb": 2048, "memory.reserve_mb": 0, "telemetry.interval_s": 0.5,
            "mqtt.reconnect_max_s": 2, **extra}


@pytest.fixture
def running(broker, assets, tmp_path):
    ra = RunningAgent(agent_overrides(broker.url, assets, tmp_path / "store"), install=[assets.v1])
    wait_for(ra.agent.connected.is_set, what="agent connected")
    yield ra
    ra.stop()


@pytest.fixture
def fleet(broker):
    with Fleet(MqttConfig(url=broker.url)) as f:
        yield f


@pytest.fixture
def raw(broker):
    c = RawClient(broker.port)
    yield c
    c.close()


def test_birth_message_lists_the_device_and_its_model(running, fleet):
    states = fleet.devices()
    assert [s.device for s in states] == [DEVICE]
    s = states[0]
    assert s.online and s.budget_mb == 2048 and "onnxruntime" in s.runtimes
    assert [(m.name, m.version, m.health) for m in s.models] == [("digits", 1, "serving")]
    assert s.hardware.cpu_count >= 1 and s.hardware.python


def test_fleet_ls_shows_each_device_with_its_models_and_agent_version(running, broker):
    import subprocess
    import sys

    from agent import __version__

    r = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "ls", "--broker", broker.url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    header, _, row = r.stdout.splitlines()[:3]
    assert header.split() == ["DEVICE", "STATE", "MODELS", "BUDGET", "HARDWARE", "AGENT", "RUNTIMES", "SINCE"]
    assert row.split()[:6] == [DEVICE, "online", "digits", "v1", "2048", "MB"]
    assert f" {__version__} " in row  # which agent each board runs: mixed during an upgrade
    # and which runtime builds: a board on an old onnxruntime reads only older models
    assert f" onnxruntime {onnxruntime.__version__}" in row


def test_the_birth_message_names_each_runtime_with_the_package_and_version_that_provide_it(running, fleet):
    from importlib import metadata

    state = next(s for s in fleet.devices() if s.device == DEVICE)
    assert state.runtime_versions["onnxruntime"] == f"onnxruntime {onnxruntime.__version__}"
    litert = next(d for d in ("ai-edge-litert", "tflite-runtime") if _installed(metadata, d))
    assert state.runtime_versions["tflite"] == f"{litert} {metadata.version(litert)}"
    assert sorted(state.runtime_versions) == sorted(state.runtimes)


def _installed(metadata, dist: str) -> bool:
    try:
        return bool(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return False


def test_birth_is_published_even_when_the_network_thread_wins_the_race(broker, assets, tmp_path, fleet,
                                                                          monkeypatch):
    """The connection can complete (and the birth go out) before start() returns: under load it did, and
    the birth was dropped, leaving a board connected but invisible. Here the network thread always wins."""
    import time as _time

    import paho.mqtt.client as paho

    real_loop_start = paho.Client.loop_start

    def loop_start_then_wait(self):
        rc = real_loop_start(self)
        deadline = _time.monotonic() + 10
        while not self.is_connected() and _time.monotonic() < deadline:
            _time.sleep(0.01)
        _time.sleep(0.3)  # the SUBACK is in and the birth was attempted
        return rc

    monkeypatch.setattr(paho.Client, "loop_start", loop_start_then_wait)
    ra = RunningAgent(agent_overrides(broker.url, assets, tmp_path / "store"), install=[assets.v1])
    try:
        states = fleet.devices()
        assert [(s.device, s.online) for s in states] == [(DEVICE, True)]
    finally:
        ra.stop()


def test_both_ends_disable_nagle_on_their_broker_sockets(running, fleet):
    """With Nagle's algorithm on, each request/response waits on delayed ACKs (88 ms instead of 1 ms)."""
    import socket

    for client in (running.agent._client, fleet._client):
        assert client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_inference_over_mqtt_matches_the_local_engine(running, fleet, assets):
    x = assets.eval_inputs(16)
    result = fleet.infer(DEVICE, "digits", {"input": x})
    local = running.agent.infer("digits", {"input": x})
    assert result["version"] == 1
    np.testing.assert_array_equal(result["outputs"]["logits"], local["logits"])
    assert (result["outputs"]["logits"].argmax(1) == assets.eval_labels(16)).mean() >= 0.8


def test_telemetry_reports_memory_and_per_model_requests(running, fleet, raw, assets):
    fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})
    raw.subscribe(protocol.telemetry_topic(DEVICE))
    msgs = raw.collect(lambda t: t.endswith("/telemetry"), 1.5)
    assert msgs, "no telemetry within 1.5 s at a 0.5 s interval"
    t = protocol.decode(protocol.Telemetry, msgs[-1].payload)
    assert t.device == DEVICE and 10 < t.rss_mb < 2048 and t.budget_mb == 2048
    assert t.load_1m >= 0 and t.disk_free_mb > 0 and t.pending_requests == 0
    m = t.models["digits"]
    assert m.requests >= 1 and m.version == 1 and m.inflight == 0
    assert m.p50_ms <= m.p95_ms <= m.p99_ms and m.mean_batch == 1.0


def test_deploy_switches_to_the_new_version_and_reports_each_step(running, fleet, raw, assets):
    raw.subscribe(protocol.events_topic(DEVICE))
    reply = fleet.deploy(assets.v2, DEVICE, chunk_size=4096)
    assert reply.status == "ok"
    assert reply.data["version"] == 2 and reply.data["previous_version"] == 1
    assert reply.data["self_test"]["top1_agreement"] == 1.0
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(2)})["version"] == 2
    assert [(m.name, m.version) for m in fleet.devices()[0].models] == [("digits", 2)]
    kinds = [json.loads(m.payload)["kind"] for m in raw.collect(lambda t: t.endswith("/events"), 0.5)]
    steps = ["deploy_receiving", "deploy_received", "deploy_verified", "deploy_staged",
             "deploy_self_test_passed", "model_switched"]
    assert [k for k in kinds if k in steps] == steps
    assert running.agent.store.current("digits")[0] == 2


def test_rollback_returns_to_the_previous_version_and_deploy_moves_forward_again(running, fleet, assets):
    fleet.deploy(assets.v2, DEVICE, chunk_size=8192)
    reply = fleet.rollback(DEVICE, "digits")
    assert (reply.data["version"], reply.data["previous_version"]) == (1, 2)
    assert reply.data["self_test"]["top1_agreement"] == 1.0
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 1
    assert [(m.name, m.version) for m in fleet.devices()[0].models] == [("digits", 1)]
    assert running.agent.store.current("digits")[0] == 1 and running.agent.store.versions("digits") == [1, 2]
    with pytest.raises(FleetError, match="no older version"):
        fleet.rollback(DEVICE, "digits")
    with pytest.raises(FleetError, match="no model named 'cats'"):
        fleet.rollback(DEVICE, "cats")
    fleet.deploy(assets.v2, DEVICE, chunk_size=8192)  # v2 again: newer than the serving v1
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 2
    with pytest.raises(FleetError, match="not an older installed version"):
        fleet.rollback(DEVICE, "digits", version=7)


def _over_budget(m):
    m.memory.load_mb = 100_000.0


def _break_reference(arrays):
    arrays["expected.logits"] = -arrays["expected.logits"]


def _bump_to_v3(m):
    m.version = 3


@pytest.mark.parametrize("variant, fragment", [
    ("unsigned", "unsigned"),
    ("intruder", "does not verify"),
    ("tampered", "sha256 does not match"),
    ("over_budget", "short by"),
    ("self_test", "failed its self-test"),
    ("same_version", "not newer"),
    ("not_a_bundle", "not an edgeward bundle"),
])
def test_a_bad_deploy_is_refused_and_the_old_model_keeps_serving(running, fleet, assets, tmp_path, variant, fragment):
    if variant == "unsigned":
        bundle = assets.unsigned_v2
    elif variant == "intruder":
        bundle = repack(assets.v2, tmp_path / "b.ewb", assets.other_key)
    elif variant == "tampered":
        bundle = flip_byte_in_member(assets.v2, tmp_path / "b.ewb", "model.onnx")
    elif variant == "over_budget":
        bundle = repack(assets.v2, tmp_path / "b.ewb", assets.key, manifest_edit=_over_budget)
    elif variant == "self_test":
        bundle = repack(assets.v2, tmp_path / "b.ewb", assets.key, manifest_edit=_bump_to_v3,
                        reference_edit=_break_reference)
    elif variant == "same_version":
        bundle = assets.v1
    else:
        bundle = tmp_path / "b.ewb"
        bundle.write_bytes(b"definitely not a tar archive " * 100)
    if variant in ("tampered", "not_a_bundle"):
        # the fleet CLI refuses to send these (it checks hashes first); a hostile client sends them anyway
        with pytest.raises(BundleError):
            fleet.deploy(bundle, DEVICE, chunk_size=4096)
        reply = _raw_deploy(fleet, bundle)
        assert reply.status == "error" and fragment in reply.error
    else:
        with pytest.raises(FleetError) as err:
            fleet.deploy(bundle, DEVICE, chunk_size=4096)
        assert fragment in str(err.value)
    # the old model still serves, the store holds nothing of the refused bundle
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 1
    store = running.agent.store
    assert store.versions("digits") == [1] and store.current("digits")[0] == 1
    assert list(store.incoming.iterdir()) == []
    assert [p.name for p in (store.models_dir / "digits").iterdir() if p.name.startswith(".")] == []


def _raw_deploy(fleet, path):
    """Deploy bypassing the fleet's local checks, as a hostile or buggy client would."""
    from agent.bundle import sha256_file

    data = path.read_bytes()
    req = protocol.DeployRequest(bundle=protocol.BundleRef(sha256=sha256_file(path), size=len(data)), chunk_size=4096)
    corr, q = fleet._request(protocol.cmd_topic(DEVICE, "deploy"), protocol.encode(req))
    first = protocol.decode(protocol.Reply, q.get(timeout=10))
    assert first.status == "progress"
    for i in first.data["missing"]:
        fleet._client.publish(protocol.upload_topic(DEVICE, req.bundle.sha256),
                              wire.pack({"v": 1, "index": i, "offset": i * 4096}, data[i * 4096:(i + 1) * 4096]), qos=1)
    return protocol.decode(protocol.Reply, q.get(timeout=20))


def test_bytes_that_do_not_hash_to_the_announced_sha_are_refused(running, fleet, raw, assets):
    data = assets.v2.read_bytes()
    req = protocol.DeployRequest(bundle=protocol.BundleRef(sha256="ab" * 32, size=len(data)), chunk_size=65536)
    first = protocol.decode(protocol.Reply, raw.request(protocol.cmd_topic(DEVICE, "deploy"), protocol.encode(req)).payload)
    assert first.status == "progress" and first.data["missing"] == list(range(first.data["n_chunks"]))
    raw.subscribe(protocol.events_topic(DEVICE))
    for i in first.data["missing"]:
        raw.publish(protocol.upload_topic(DEVICE, "ab" * 32),
                    wire.pack({"v": 1, "index": i, "offset": i * 65536}, data[i * 65536:(i + 1) * 65536]))
    events = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: t.endswith("/events"), 0.2)
                               if json.loads(m.payload)["kind"] == "deploy_failed"], what="deploy_failed event")
    assert "hashes to" in events[0]["message"]
    assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 1
    assert list(running.agent.store.incoming.iterdir()) == []


@pytest.mark.parametrize("topic_suffix, payload, code, fragment", [
    ("cmd/deploy", b"\x00\x01garbage", "bad_message", "not valid JSON"),
    ("cmd/deploy", b'{"bundle": {"sha256": "zz", "size": 1}}', "bad_message", "bundle.sha256"),
    ("cmd/deploy", b'{"v": 9, "bundle": {}}', "bad_message", "protocol version 9"),
    ("cmd/ping", b"[]", "bad_message", "expected a JSON object"),
    ("cmd/format-disk", b"{}", "unknown_command", "unknown command"),
    ("infer/digits", b"not a frame", "bad_message", "EWF1"),
    ("infer/digits", wire.pack_tensors({"input": np.zeros((1, 1, 8, 8), np.float64)}, v=1), "bad_request", "dtype float64"),
    ("infer/digits", wire.pack_tensors({"input": np.zeros((1, 1, 4, 4), np.float32)}, v=1), "bad_request", "shape"),
    ("infer/cats", wire.pack_tensors({"input": np.zeros((1, 1, 8, 8), np.float32)}, v=1), "unknown_model", "no model named"),
    ("infer/digits", wire.pack_tensors({"input": np.zeros((40, 1, 8, 8), np.float32)}, v=1, pad="x" * 70000), "bad_message", "over the"),
    ("cmd/ping", b"{" + b" " * 70000 + b"}", "bad_message", "over the"),
])
def test_malformed_and_oversized_messages_get_an_error_reply_and_harm_nothing(
        broker, assets, tmp_path, raw, topic_suffix, payload, code, fragment):
    ra = RunningAgent(agent_overrides(broker.url, assets, tmp_path / "store", **{"mqtt.max_payload_kb": 64}),
                      install=[assets.v1])
    try:
        wait_for(ra.agent.connected.is_set)
        msg = raw.request(f"edgeward/v1/{DEVICE}/{topic_suffix}", payload)
        assert msg is not None, "no error reply"
        body = wire.unpack(msg.payload)[0] if msg.payload.startswith(wire.MAGIC) else json.loads(msg.payload)
        assert body["status"] == "error" and body["code"] == code and fragment in body["error"], body
        # still alive, still serving
        ok = raw.request(protocol.cmd_topic(DEVICE, "ping"), protocol.encode(protocol.PingRequest()))
        assert json.loads(ok.payload)["status"] == "ok"
        out = ra.agent.infer("digits", {"input": assets.eval_inputs(1)})
        assert out["logits"].shape == (1, 10)
    finally:
        ra.stop()


def _settled(agent):
    """Every message handed to the agent so far has been handled (its ping answered, its queue drained)."""
    agent._update_pool.submit(lambda: None).result(timeout=10)


def test_retained_commands_are_ignored_live_and_on_resubscribe(running, raw, assets):
    deploy = protocol.encode(protocol.DeployRequest(bundle=protocol.BundleRef(sha256="cd" * 32, size=10)))
    # published retained while the agent is subscribed: without retainAsPublished it arrives with retain=0
    raw.publish(protocol.cmd_topic(DEVICE, "deploy"), deploy, retain=True)
    assert json.loads(raw.request(protocol.cmd_topic(DEVICE, "ping"),
                                  protocol.encode(protocol.PingRequest())).payload)["status"] == "ok"
    _settled(running.agent)
    assert running.agent._transfers == {}
    # a reconnect re-delivers retained messages on subscribe: still not acted upon
    running.agent._client.subscribe(protocol.cmd_topic(DEVICE, "deploy"),
                                    options=SubscribeOptions(qos=1, retainAsPublished=True))
    raw.request(protocol.cmd_topic(DEVICE, "ping"), protocol.encode(protocol.PingRequest()))
    _settled(running.agent)
    assert running.agent._transfers == {}
    assert list(running.agent.store.incoming.iterdir()) == []
    raw.publish(protocol.cmd_topic(DEVICE, "deploy"), b"", retain=True)  # clear the retained message


def test_stray_chunks_are_dropped(running, raw):
    raw.publish(protocol.upload_topic(DEVICE, "ef" * 32), wire.pack({"v": 1, "index": 0, "offset": 0}, b"x" * 10))
    raw.publish(f"edgeward/v1/{DEVICE}/upload/not-a-sha", b"\xff" * 50)
    raw.request(protocol.cmd_topic(DEVICE, "ping"), protocol.encode(protocol.PingRequest()))
    _settled(running.agent)
    assert running.agent._transfers == {}
    assert list(running.agent.store.incoming.iterdir()) == []


def test_mqtt_311_clients_can_use_reply_to_in_the_body(running, raw, assets):
    raw.subscribe("legacy/replies")
    raw.publish(protocol.cmd_topic(DEVICE, "ping"), json.dumps({"v": 1, "reply_to": "legacy/replies",
                                                                 "corr": "abc-1"}).encode())
    msgs = wait_for(lambda: raw.collect(lambda t: t == "legacy/replies", 0.2), what="legacy reply")
    body = json.loads(msgs[0].payload)
    assert body["status"] == "ok" and body["corr"] == "abc-1" and body["data"]["device"] == DEVICE


def test_mqtt_311_clients_can_infer_with_reply_to_in_the_frame_header(running, raw, assets):
    raw.subscribe("legacy/infer-replies")
    frame = wire.pack_tensors({"input": assets.eval_inputs(2)}, v=1, reply_to="legacy/infer-replies", corr="req-7")
    raw.publish(protocol.infer_topic(DEVICE, "digits"), frame)
    msgs = wait_for(lambda: raw.collect(lambda t: t == "legacy/infer-replies", 0.2), what="legacy inference reply")
    header, outputs = wire.unpack_tensors(msgs[0].payload)
    assert header["status"] == "ok" and header["corr"] == "req-7"
    np.testing.assert_array_equal(outputs["logits"], running.agent.infer("digits", {"input": assets.eval_inputs(2)})["logits"])


def test_agent_without_a_broker_serves_locally_then_connects_when_one_appears(assets, tmp_path):
    port = free_port()
    ra = RunningAgent(agent_overrides(f"mqtt://127.0.0.1:{port}", assets, tmp_path / "store"), install=[assets.v1])
    try:
        # no broker: the agent is up, not connected, and serves local work
        assert not ra.agent.connected.wait(1.5)
        assert ra.thread.is_alive()
        out = ra.agent.infer("digits", {"input": assets.eval_inputs(4)})
        assert out["logits"].argmax(1).tolist() == ra.agent.infer("digits", {"input": assets.eval_inputs(4)})["logits"].argmax(1).tolist()
        with LocalBroker(port=port, workdir=tmp_path / "late-broker"):
            wait_for(ra.agent.connected.is_set, timeout=15, what="connection after the broker came up")
            with Fleet(MqttConfig(url=f"mqtt://127.0.0.1:{port}")) as fleet:
                states = wait_for(lambda: [s for s in fleet.devices() if s.online], timeout=5, what="birth")
                assert states[0].models[0].version == 1
                assert fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(1)})["version"] == 1
    finally:
        ra.stop()


def test_clean_stop_publishes_the_offline_state(broker, assets, tmp_path, fleet):
    ra = RunningAgent(agent_overrides(broker.url, assets, tmp_path / "store"), install=[assets.v1])
    wait_for(ra.agent.connected.is_set)
    assert fleet.devices()[0].online
    ra.stop()
    states = fleet.devices()
    assert [(s.device, s.online) for s in states] == [(DEVICE, False)]
