"""End to end through the real command line, as a user runs it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.fleet import Fleet

from mqttkit import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_demo_runs_end_to_end(tmp_path):
    """The README's first command: broker, model, convert, agent, infer, deploy, refusal, telemetry, stop."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--workdir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "8/8 right" in out or "7/8 right" in out
    assert "digits v2 is serving (was v1); self-test passed" in out
    assert "does not verify against the 1 trusted key" in out
    assert "telemetry  memory" in out
    assert "OFFLINE" in out
    assert (tmp_path / "demo" / "store" / "models" / "digits" / "current").is_symlink()


def _agent_cmd(broker, assets, store):
    return [sys.executable, "-m", "agent.cli", "agent", "--broker", broker.url, "--device-id", "pi-cli",
            "--store", str(store), "--trust-key", str(assets.pub), "--install", str(assets.v1), "--budget-mb", "512"]


def test_an_agent_killed_hard_is_marked_offline_by_its_last_will(broker, assets, tmp_path):
    proc = subprocess.Popen(_agent_cmd(broker, assets, tmp_path / "store"), stderr=subprocess.PIPE, text=True)
    try:
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            wait_for(lambda: any(s.online for s in fleet.devices()), timeout=30, what="birth")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            states = wait_for(lambda: [s for s in fleet.devices() if not s.online], timeout=10, what="last will")
            assert states[0].device == "pi-cli"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_restarted_agent_serves_its_store_without_reinstalling(broker, assets, tmp_path):
    store = tmp_path / "store"
    for attempt in range(2):  # the second start finds v1 installed and skips --install
        proc = subprocess.Popen(_agent_cmd(broker, assets, store), stderr=subprocess.PIPE, text=True)
        try:
            with Fleet(MqttConfig(url=broker.url)) as fleet:
                wait_for(lambda: any(s.online for s in fleet.devices()), timeout=30, what="birth")
                assert fleet.infer("pi-cli", "digits", {"input": assets.eval_inputs(1)})["version"] == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    assert "not installing" in err and "not newer" in err


def test_bad_configuration_stops_the_agent_with_one_clear_line(tmp_path, assets):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("memory:\n  budget_mb: lots\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg), "--trust-key", str(assets.pub)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"edgeward: error: memory.budget_mb: expected an integer, got 'lots': fix it in {cfg}"]
