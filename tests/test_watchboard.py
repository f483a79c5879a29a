"""`fleet watch`: the live table folds state, telemetry and events into one row per device and model."""

import subprocess
import sys

import pytest

from agent.watchboard import WatchBoard

from test_agent_mqtt import DEVICE, fleet, running  # noqa: F401  (fixtures)


def _telemetry(ts, requests, errors=0, p50=1.5):
    return {"ts": ts, "rss_mb": 61.2, "budget_mb": 256, "cpu_percent": 12.0, "temperature_c": 48.4,
            "models": {"kws": {"version": 3, "requests": requests, "errors": errors, "p50_ms": p50, "p95_ms": 4.0}}}


def test_the_board_shows_rates_versions_and_the_last_event_per_device():
    b = WatchBoard()
    b.update("pi-01", "state", {"ts": 100.0, "online": True, "models": [{"name": "kws", "version": 3},
                                                                         {"name": "vad", "version": 1}]})
    b.update("pi-01", "telemetry", _telemetry(100.0, 50))
    b.update("pi-01", "telemetry", _telemetry(110.0, 150, errors=2))
    b.update("pi-01", "events", {"ts": 111.0, "level": "error", "kind": "deploy_failed", "message": "short by 3 MB"})
    b.update("pi-02", "state", {"ts": 90.0, "online": False, "models": []})
    rows = b.rows(now=115.0)
    assert rows[0][:8] == ["pi-01", "online", "kws v3", "10.0", 150, 2, 1.5, 4.0]
    assert rows[0][8:12] == ["61/256", "12", "48°C", "4s ago"]
    assert rows[0][12] == "ERROR deploy_failed: short by 3 MB"
    assert rows[1][:3] == ["", "", "vad v1"] and rows[1][3] == ""  # loaded, no traffic reported yet
    assert rows[2][:3] == ["pi-02", "OFFLINE", "-"]
    text = b.render(now=115.0)
    assert text.splitlines()[0].split()[:3] == ["DEVICE", "STATE", "MODEL"] and "pi-02" in text


def test_a_restarted_device_does_not_show_a_negative_rate():
    b = WatchBoard()
    b.update("pi-01", "telemetry", _telemetry(100.0, 500))
    b.update("pi-01", "telemetry", _telemetry(105.0, 10))  # counters restart with the agent
    assert b.rows(now=106.0)[0][3] == "0.0"


@pytest.mark.integration
def test_fleet_watch_prints_the_table_of_a_real_device(running, fleet, broker, assets):
    fleet.infer(DEVICE, "digits", {"input": assets.eval_inputs(3)})
    r = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "watch", "--table", "--seconds", "2.5",
                        "--broker", broker.url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("DEVICE"))
    row = lines[header + 2]
    assert row.split()[:4] == [DEVICE, "online", "digits", "v1"]
    reqs_end = lines[header].index("REQS") + len("REQS")  # numbers are right-aligned under their header
    assert int(row[:reqs_end].split()[-1]) >= 1, r.stdout  # the request above, counted in telemetry
