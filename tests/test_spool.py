"""Telemetry and events survive a broker outage and an agent restart: the on-disk spool."""

import json
import threading

import pytest

from agent import protocol
from agent.devbroker import LocalBroker, free_port
from agent.spool import Spool

from mqttkit import RawClient, RunningAgent, wait_for


def test_spool_keeps_order_and_forgets_only_what_was_acknowledged(tmp_path):
    s = Spool(tmp_path / "s.sqlite", max_bytes=1 << 20)
    for i in range(5):
        s.append("telemetry", "t", f"m{i}".encode())
    rows = s.peek(3)
    assert [p for _, _, p, _ in rows] == [b"m0", b"m1", b"m2"]
    s.remove([rows[0][0], rows[1][0]])
    assert [p for _, _, p, _ in s.peek(10)] == [b"m2", b"m3", b"m4"]
    assert s.stats().queued == 3 and s.stats().queued_bytes == 6


def test_a_full_spool_drops_oldest_telemetry_first_and_counts(tmp_path):
    s = Spool(tmp_path / "s.sqlite", max_bytes=100)
    s.append("event", "e", b"E" * 30)
    for i in range(10):
        s.append("telemetry", "t", bytes([48 + i]) * 20)
    payloads = [p for _, _, p, _ in s.peek(100)]
    assert payloads[0] == b"E" * 30                     # the event survived
    assert payloads[1:] == [bytes([48 + i]) * 20 for i in range(7, 10)]  # the newest telemetry
    st = s.stats()
    assert st.dropped_telemetry == 7 and st.dropped_events == 0 and st.queued_bytes <= 100
    for i in range(5):                                  # only events left to drop: the oldest go
        s.append("event", "e", b"F" * 40)
    st = s.stats()
    assert st.dropped_telemetry == 10 and st.dropped_events >= 1 and st.queued_bytes <= 100


def test_the_spool_survives_reopening(tmp_path):
    s = Spool(tmp_path / "s.sqlite", max_bytes=60)
    for i in range(5):
        s.append("telemetry", "t", b"x" * 20)
    s.close()
    again = Spool(tmp_path / "s.sqlite", max_bytes=60)
    assert again.stats().queued == 3 and again.stats().dropped_telemetry == 2
    with pytest.raises(ValueError):
        again.append("gossip", "t", b"")


def _overrides(url, assets, store):
    return {"mqtt.url": url, "device.id": "pi-spool", "store.path": str(store), "trust.keys": [str(assets.pub)],
            "memory.budget_mb": 2048, "memory.reserve_mb": 0, "telemetry.interval_s": 0.2,
            "mqtt.reconnect_max_s": 2}


def test_what_happened_offline_is_delivered_in_order_after_connecting(assets, tmp_path, monkeypatch):
    port = free_port()
    ra = RunningAgent(_overrides(f"mqtt://127.0.0.1:{port}", assets, tmp_path / "store"), install=[assets.v1])
    gate = threading.Event()
    real_drain = ra.agent._drain_spool
    monkeypatch.setattr(ra.agent, "_drain_spool", lambda *a, **k: (gate.wait(30), real_drain(*a, **k)))
    try:
        wait_for(lambda: len(ra.agent.spool) >= 6, timeout=10, what="telemetry spooled while offline")
        with LocalBroker(port=port, workdir=tmp_path / "broker"):
            raw = RawClient(port)
            raw.subscribe("edgeward/v1/pi-spool/+")
            wait_for(ra.agent.connected.is_set, timeout=15, what="the agent's connection")
            connected_at = json.loads(raw.collect(lambda t: t.endswith("/state"), 2)[-1].payload)["ts"]
            gate.set()
            msgs = wait_for(lambda: [json.loads(m.payload) for m in raw.collect(lambda t: "/state" not in t, 1.0)],
                            timeout=10, what="the spooled messages")
            events = [m for m in msgs if "kind" in m]
            telemetry = [m for m in msgs if "rss_mb" in m]
            assert [e["kind"] for e in events][:4] == ["deploy_verified", "deploy_staged",
                                                       "deploy_self_test_passed", "model_switched"]
            old = [t for t in telemetry if t["ts"] < connected_at]
            assert len(old) >= 5, "telemetry recorded offline was not delivered"
            stamps = [t["ts"] for t in telemetry]
            assert stamps == sorted(stamps)  # in order, with their original timestamps
            wait_for(lambda: len(ra.agent.spool) == 0, timeout=5, what="an empty spool")
            raw.close()
    finally:
        gate.set()
        ra.stop()


def test_what_was_spooled_survives_an_agent_restart(assets, tmp_path):
    port = free_port()
    store = tmp_path / "store"
    first = RunningAgent(_overrides(f"mqtt://127.0.0.1:{port}", assets, store), install=[assets.v1])
    wait_for(lambda: len(first.agent.spool) >= 3, timeout=10, what="spooled telemetry")
    first.stop()
    with LocalBroker(port=port, workdir=tmp_path / "broker"):
        raw = RawClient(port)
        raw.subscribe(protocol.events_topic("pi-spool"))
        second = RunningAgent(_overrides(f"mqtt://127.0.0.1:{port}", assets, store))
        try:
            kinds = wait_for(lambda: [json.loads(m.payload)["kind"] for m in raw.collect(lambda t: True, 0.5)],
                             timeout=15, what="the first agent's events")
            assert "model_switched" in kinds  # emitted by the first agent, offline, before it stopped
        finally:
            second.stop()
            raw.close()
