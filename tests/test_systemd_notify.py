"""sd_notify against real datagram sockets: READY, STATUS, WATCHDOG from the main loop, STOPPING on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from agent.systemd import Notifier

from mqttkit import RunningAgent, wait_for


class NotifySocket:
    """What systemd listens on: a datagram socket, by path or in the abstract namespace ('@name')."""

    def __init__(self, tmp_path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edgeward-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            os.chmod(path, 0o666)
            self.env_value = path
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify_socket(request, tmp_path):
    s = NotifySocket(tmp_path, abstract=request.param)
    yield s
    s.close()


def test_notifier_reaches_both_socket_forms(notify_socket):
    n = Notifier({"NOTIFY_SOCKET": notify_socket.env_value})
    n.ready("serving digits v1")
    wait_for(lambda: notify_socket.with_key("READY"), timeout=2, what="READY=1")
    assert notify_socket.with_key("READY")[0][1] == {"READY": "1", "STATUS": "serving digits v1"}


def test_notifier_is_silent_outside_systemd_and_honours_watchdog_pid():
    assert Notifier({}).notify(READY=1) is False
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval_s == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


def test_a_wedged_main_loop_stops_the_watchdog_pings(broker, assets, tmp_path, monkeypatch):
    sock = NotifySocket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    ra = RunningAgent({"mqtt.url": broker.url, "device.id": "pi-wd", "store.path": str(tmp_path / "store"),
                       "trust.keys": [str(assets.pub)], "memory.budget_mb": 2048, "memory.reserve_mb": 0,
                       "telemetry.interval_s": 0.3}, install=[assets.v1])
    release = threading.Event()
    try:
        wait_for(lambda: len(sock.with_key("WATCHDOG")) >= 3, timeout=5, what="watchdog pings")
        ready = sock.with_key("READY")
        assert ready and "serving digits v1" in ready[0][1]["STATUS"]
        # wedge: the next periodic work in the main loop hangs (as a stuck call would)
        real_tick = ra.agent.tick
        wedged = threading.Event()

        def hung_tick():
            wedged.set()
            release.wait(30)
            real_tick()
        monkeypatch.setattr(ra.agent, "tick", hung_tick)
        assert wedged.wait(5)
        t0 = time.monotonic()
        time.sleep(1.2)
        assert [t for t, _ in sock.with_key("WATCHDOG") if t > t0 + 0.25] == [], "pings continued while wedged"
        assert ra.thread.is_alive()
        release.set()  # unwedged: the pings resume
        t1 = time.monotonic()
        wait_for(lambda: [t for t, _ in sock.with_key("WATCHDOG") if t > t1], timeout=3, what="pings after release")
    finally:
        release.set()
        ra.stop()
        sock.close()


def test_sigterm_says_stopping_drains_and_exits_cleanly(broker, assets, tmp_path):
    sock = NotifySocket(tmp_path, abstract=True)
    env = {**os.environ, "NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "2000000", "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--broker", broker.url, "--device-id", "pi-term",
                             "--store", str(tmp_path / "store"), "--trust-key", str(assets.pub), "--install", str(assets.v1)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sock.with_key("READY"), timeout=30, what="READY=1")
        assert "serving digits v1" in sock.with_key("READY")[0][1]["STATUS"]
        wait_for(lambda: sock.with_key("WATCHDOG"), timeout=5, what="a watchdog ping")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0, err
    stopping = sock.with_key("STOPPING")
    assert stopping and stopping[0][0] > sock.with_key("READY")[0][0]
    # journald-friendly: syslog priority prefixes, no timestamps of our own
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("<") and ">" in ln[:4] for ln in lines if not ln.startswith(" ")), err
    assert any(ln.startswith("<6>edgeward.agent: agent pi-term stopped") for ln in lines), err


def test_a_tick_reads_the_memory_once_for_telemetry_the_status_file_and_the_status_line(assets, tmp_path,
                                                                                         monkeypatch):
    """Reading PSS walks every process's mappings: one reading serves all three reports of a tick."""
    from agent import protocol
    from agent.config import load_config
    from agent.daemon import Agent
    from agent.status import read_status

    cfg = load_config(None, {"mqtt.url": "mqtt://127.0.0.1:9", "device.id": "pi-tick",
                             "store.path": str(tmp_path / "store"), "trust.keys": [str(assets.pub)]})
    agent = Agent(cfg)
    try:
        readings = iter([(111.0, 77.0), (999.0, 999.0)])
        calls, lines = [], []
        monkeypatch.setattr(agent.budget, "measure", lambda: calls.append(1) or next(readings))
        monkeypatch.setattr(agent.notifier, "status", lines.append)
        agent.tick()
        assert len(calls) == 1
        (_, topic, payload, _), = agent.spool.peek()  # no broker here: the telemetry waits in the spool
        telemetry = protocol.decode(protocol.Telemetry, payload)
        assert topic == protocol.telemetry_topic("pi-tick")
        assert (telemetry.rss_mb, telemetry.memory_mb) == (111.0, 77.0)
        memory = read_status(tmp_path / "store")["memory"]
        assert (memory["rss_mb"], memory["used_mb"]) == (111.0, 77.0)
        assert lines and "memory 77/" in lines[0]
    finally:
        agent.spool.close()
        agent.engine.close()
