"""Staged rollouts against four real agents: waves, health gates, halt and rollback, resume after a crash."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from agent import protocol, wire
from agent.config import MqttConfig
from agent.fleet import Fleet
from agent.rollout import Gates, Rollout, plan_waves

from conftest import repack
from mqttkit import RawClient, RunningAgent, wait_for

pytestmark = pytest.mark.integration
DEVICES = ["pi-r0", "pi-r1", "pi-r2", "pi-r3"]


@pytest.mark.parametrize("n, canary, waves, sizes", [
    (10, "1", 3, [1, 3, 3, 3]), (10, "20%", 1, [2, 8]), (10, None, 2, [5, 5]), (3, "5", 2, [3]),
    (200, "5%", 3, [10, 63, 63, 64]), (1, "50%", 1, [1]),
])
def test_wave_plans(n, canary, waves, sizes):
    plan = plan_waves([f"d{i:03d}" for i in range(n)], canary, waves)
    assert [len(w) for w in plan] == sizes
    assert sorted(d for w in plan for d in w) == [f"d{i:03d}" for i in range(n)]


@pytest.fixture
def fleet_of_four(broker, assets, tmp_path):
    agents = [RunningAgent({"mqtt.url": broker.url, "device.id": d, "device.groups": ["lab"],
                            "store.path": str(tmp_path / d), "trust.keys": [str(assets.pub)],
                            "memory.budget_mb": 2048, "memory.reserve_mb": 0, "telemetry.interval_s": 0.25},
                           install=[assets.v1]) for d in DEVICES]
    for a in agents:
        wait_for(a.agent.connected.is_set, what="agents connected")
    with Fleet(MqttConfig(url=broker.url)) as fleet:
        yield fleet, {a.agent.device: a for a in agents}
    for a in agents:
        a.stop()


def _versions(agents):
    return {d: a.agent.engine.get("digits").version for d, a in agents.items()}


def test_a_healthy_rollout_reaches_every_device_wave_by_wave(fleet_of_four, assets, tmp_path):
    fleet, agents = fleet_of_four
    log = []
    r = Rollout.create(fleet, assets.v2, DEVICES, canary="1", waves=2, gates=Gates(soak_s=1.0),
                       state_dir=tmp_path / "rollouts", progress=log.append)
    state = r.run()
    assert state.state == "done" and state.waves == [["pi-r0"], ["pi-r1"], ["pi-r2", "pi-r3"]]
    assert _versions(agents) == {d: 2 for d in DEVICES}
    assert {res.status for res in state.devices.values()} == {"healthy"}
    assert sum("soaking" in m for m in log) == 3


def test_a_canary_that_errors_halts_the_rollout_and_is_rolled_back(fleet_of_four, assets, broker, tmp_path):
    fleet, agents = fleet_of_four
    raw = RawClient(broker.port)
    bad = wire.pack_tensors({"input": np.zeros((1, 1, 8, 8), np.float64)}, v=1)  # wrong dtype: an error each
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            raw.publish(protocol.infer_topic("pi-r0", "digits"), bad, qos=0)
            stop.wait(0.02)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        r = Rollout.create(fleet, assets.v2, DEVICES, canary="1", waves=1,
                           gates=Gates(soak_s=1.2, max_error_rate=0.05), state_dir=tmp_path / "rollouts")
        state = r.run()
    finally:
        stop.set()
        t.join()
        raw.close()
    assert state.state == "halted" and "pi-r0: error rate" in state.reason
    assert state.devices["pi-r0"].status == "rolled_back"
    assert _versions(agents) == {d: 1 for d in DEVICES}  # canary back on v1, the rest never touched
    assert [res.status for d, res in state.devices.items() if d != "pi-r0"] == ["pending"] * 3


def test_a_bundle_that_fails_its_self_test_halts_at_the_canary(fleet_of_four, assets, tmp_path):
    fleet, agents = fleet_of_four

    def break_reference(arrays):
        arrays["expected.logits"] = -arrays["expected.logits"]
    broken = repack(assets.v2, tmp_path / "broken.ewb", assets.key, reference_edit=break_reference)
    state = Rollout.create(fleet, broken, DEVICES, canary="1", waves=1, gates=Gates(soak_s=1.0),
                           state_dir=tmp_path / "rollouts").run()
    assert state.state == "halted" and "failed its self-test" in state.reason
    assert state.devices["pi-r0"].status == "failed"
    assert _versions(agents) == {d: 1 for d in DEVICES}


def test_an_interrupted_rollout_resumes_where_it_stopped(fleet_of_four, assets, tmp_path):
    fleet, agents = fleet_of_four

    def crash_at_wave_two(msg):
        if msg.startswith("wave 2/"):
            raise KeyboardInterrupt  # the operator's laptop goes to sleep, the CLI dies
    r = Rollout.create(fleet, assets.v2, DEVICES, canary="2", waves=1, gates=Gates(),
                       state_dir=tmp_path / "rollouts", progress=crash_at_wave_two)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    assert _versions(agents) == {"pi-r0": 2, "pi-r1": 2, "pi-r2": 1, "pi-r3": 1}
    canary_updated_at = agents["pi-r0"].agent.last_update["ts"]
    resumed = Rollout.load(fleet, r.s.id, tmp_path / "rollouts")
    assert resumed.s.wave == 1
    state = resumed.run()
    assert state.state == "done" and _versions(agents) == {d: 2 for d in DEVICES}
    assert agents["pi-r0"].agent.last_update["ts"] == canary_updated_at  # the canary wave was not redone


def test_the_cli_runs_lists_and_shows_rollouts(fleet_of_four, assets, broker, tmp_path):
    state_dir = tmp_path / "rollouts"
    cli = [sys.executable, "-m", "agent.cli", "fleet"]
    r = subprocess.run([*cli, "deploy", str(assets.v2), "--group", "lab", "--canary", "25%", "--soak", "0.8",
                        "--state-dir", str(state_dir), "--broker", broker.url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "digits v2 — DONE" in r.stdout and r.stdout.count("healthy") == 4
    ls = subprocess.run([*cli, "rollout", "ls", "--state-dir", str(state_dir), "--broker", broker.url],
                        capture_output=True, text=True, timeout=60)
    rollout_id = ls.stdout.splitlines()[2].split()[0]
    assert "done" in ls.stdout
    st = subprocess.run([*cli, "rollout", "status", rollout_id, "--state-dir", str(state_dir), "--broker", broker.url],
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "pi-r3" in st.stdout
