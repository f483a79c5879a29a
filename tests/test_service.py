"""The systemd service: the unit verifies cleanly, the board installer works unattended in a throwaway
root, and the daemon runs the way the unit starts it (same ExecStart, environment, unprivileged user)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.fleet import Fleet

from mqttkit import wait_for
from test_systemd_notify import NotifySocket

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edgeward-agent.service"
INSTALL = ROOT / "scripts" / "install-board.sh"
EDGEWARD = Path(sys.executable).parent / "edgeward"


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed on this machine")


def _unit_with_real_binary(tmp_path, text=None) -> Path:
    """systemd-analyze verify fails when ExecStart's binary is missing: point it at this venv's edgeward."""
    out = tmp_path / "edgeward-agent.service"
    out.write_text((text or UNIT.read_text()).replace("/opt/edgeward/venv/bin/edgeward", str(EDGEWARD)))
    return out


def _verify(path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_unit_verifies_without_a_single_warning(tmp_path):
    _need("systemd-analyze")
    r = _verify(_unit_with_real_binary(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_verification_would_catch_a_bad_key(tmp_path):
    """systemd-analyze exits 0 on unknown keys; this proves the test above reads its output."""
    _need("systemd-analyze")
    r = _verify(_unit_with_real_binary(tmp_path, UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")))
    assert "NoNewPrivilege" in r.stdout + r.stderr


def test_unit_has_the_required_life_cycle_and_hardening():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=",
                 "TimeoutStopSec=", "DynamicUser=yes", "StateDirectory=edgeward", "ConfigurationDirectory=edgeward",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "MemoryMax=",
                 "MemoryHigh=", "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service"):
        assert line in text, line
    assert not re.search(r"^User=", text, re.M)  # never root, never a fixed account


def test_exposure_score_is_low_and_the_one_in_the_docs(tmp_path):
    _need("systemd-analyze")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edgeward-agent.service: ([0-9.]+) (\w+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    assert score <= 2.0, score
    assert f"{m.group(1)} {m.group(2)}" in (ROOT / "docs" / "SERVICE.md").read_text()


MDWE_PROBE = r"""
import ctypes, mmap, sys
import numpy as np
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:           # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("unsupported"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("not-enforced"); sys.exit(0)
except OSError:
    pass
from agent.budget import Budget
from agent.bundle import open_bundle
from agent.engine import Engine
from agent.signing import load_public_key
from agent.store import Store
import ai_edge_litert.interpreter, paho.mqtt.client, cryptography.hazmat.primitives.asymmetric.ed25519
folder = Store(sys.argv[3]).install(open_bundle(sys.argv[1], [load_public_key(sys.argv[2])]))
model = Engine(Budget(2048)).load(folder)
print("ok", model.self_test()["top1_agreement"])
"""


def test_the_agent_tolerates_memory_deny_write_execute(assets, tmp_path):
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's PR_SET_MDWE applies the same rule here."""
    r = subprocess.run([sys.executable, "-c", MDWE_PROBE, str(assets.v1), str(assets.pub), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    if r.stdout.strip() in ("unsupported", "not-enforced"):
        pytest.skip(f"this kernel cannot enforce MDWE ({r.stdout.strip()})")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok 1.0"


# ------------------------------------------------------------------ the board installer

def _run_install(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=600)


def _tree_digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[:3] == ("opt", "edgeward", "venv") or p.name == "install.log":
            continue
        out[str(rel)] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


@pytest.fixture(scope="module")
def board_root(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("board") / "root"
    r = _run_install("--root", root, "--device-id", "pi-42", "--broker", "mqtt://10.1.2.3:1883",
                     "--trust-key", assets.pub, "--budget-mb", "512")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_installer_lays_out_the_board(board_root, assets):
    etc = board_root / "etc"
    cfg = (etc / "edgeward" / "agent.yaml").read_text()
    assert "id: pi-42" in cfg and "url: mqtt://10.1.2.3:1883" in cfg and "budget_mb: 512" in cfg
    assert f"keys: [/etc/edgeward/trusted/{assets.pub.name}]" in cfg
    assert (etc / "edgeward" / "trusted" / assets.pub.name).read_bytes() == assets.pub.read_bytes()
    assert (etc / "systemd" / "system" / "edgeward-agent.service").read_text() == UNIT.read_text()
    dropin = (etc / "systemd" / "system" / "edgeward-agent.service.d" / "10-memory.conf").read_text()
    assert "MemoryHigh=640M" in dropin and "MemoryMax=768M" in dropin  # from the 512 MB budget
    wants = etc / "systemd" / "system" / "multi-user.target.wants" / "edgeward-agent.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/edgeward-agent.service"


def test_installer_puts_only_the_device_extras_in_the_venv(board_root):
    py = board_root / "opt" / "edgeward" / "venv" / "bin" / "python"
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['agent', 'onnxruntime', 'ai_edge_litert', 'paho', 'psutil', 'onnx', 'sklearn', 'scipy', 'sympy', 'torch']}))")
    found = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    assert found == {"agent": True, "onnxruntime": True, "ai_edge_litert": True, "paho": True, "psutil": True,
                     "onnx": False, "sklearn": False, "scipy": False, "sympy": False, "torch": False}


def _distributions(root: Path) -> dict:
    py = root / "opt" / "edgeward" / "venv" / "bin" / "python"
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower(): d.version "
            "for d in m.distributions()}))")
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)


def test_installer_takes_the_boards_own_onnxruntime_build_and_keeps_it(assets, tmp_path):
    """A Jetson's onnxruntime-gpu and PyPI's CPU onnxruntime share one module: the board's own
    build is installed alone, with numpy 1 when it was built for it (JetPack 6's 1.17 was), and
    an update without the flag keeps it. PyPI's onnxruntime 1.17.3 stands in for the GPU wheel."""
    def only_that_build_with_numpy_1():
        dists = _distributions(root)
        return dists["onnxruntime"] == "1.17.3" and "onnxruntime-gpu" not in dists and dists["numpy"].startswith("1.")

    root = tmp_path / "root"
    r = _run_install("--root", root, "--trust-key", assets.pub, "--onnxruntime", "onnxruntime==1.17.3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnxruntime 1.17.3 with" in r.stdout and "installing numpy<2 beside it" in r.stdout
    assert only_that_build_with_numpy_1()
    r = _run_install("--root", root, "--trust-key", assets.pub)  # an update, the flag not repeated
    assert r.returncode == 0, r.stdout + r.stderr
    assert "and onnxruntime from onnxruntime==1.17.3" in r.stdout
    assert only_that_build_with_numpy_1()


def test_installer_says_when_the_boards_onnxruntime_build_cannot_be_installed(assets, tmp_path):
    r = _run_install("--root", tmp_path / "root", "--trust-key", assets.pub,
                     "--onnxruntime", tmp_path / "onnxruntime_gpu-1.17.0-cp310-cp310-linux_aarch64.whl")
    assert r.returncode != 0 and "pip failed; the whole log is in" in r.stderr
    assert not (tmp_path / "root" / "opt" / "edgeward" / "onnxruntime-requirements").exists()


def test_installer_is_idempotent(board_root, assets):
    before = _tree_digest(board_root)
    r = _run_install("--root", board_root, "--trust-key", assets.pub, "--budget-mb", "512")
    assert r.returncode == 0, r.stderr
    assert "kept the existing /etc/edgeward/agent.yaml" in r.stdout
    assert _tree_digest(board_root) == before


@pytest.mark.parametrize("args, fragment", [
    (["--budget-mb", "lots"], "--budget-mb must be a whole number"),
    (["--broker", "http://x"], "--broker must look like mqtt://"),
    (["--trust-key", "/nonexistent.pub"], "no such file"),
    (["--frobnicate"], "unknown option --frobnicate"),
])
def test_installer_refuses_bad_flags_with_one_line(tmp_path, args, fragment):
    r = _run_install("--root", tmp_path / "root", *args)
    assert r.returncode != 0
    assert fragment in r.stderr
    assert not (tmp_path / "root" / "etc" / "systemd").exists()


def test_uninstall_keeps_the_model_store_unless_purged(board_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(board_root, root, symlinks=True)
    store = root / "var" / "lib" / "edgeward" / "models" / "digits" / "v1"
    store.mkdir(parents=True)
    r = _run_install("--root", root, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert store.is_dir()
    assert not (root / "opt" / "edgeward").exists() and not (root / "etc" / "edgeward").exists()
    assert not (root / "etc" / "systemd" / "system" / "edgeward-agent.service").exists()
    assert not (root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edgeward-agent.service").exists()
    r = _run_install("--root", root, "--uninstall", "--purge")
    assert r.returncode == 0 and not (root / "var" / "lib" / "edgeward").exists()


# ------------------------------------------------------------------ the daemon as the unit starts it

def _unit_service_settings(unit_text: str) -> tuple[list[str], dict]:
    exec_start = re.search(r"^ExecStart=(.+)$", unit_text, re.M).group(1).split()
    env = {}
    for line in re.findall(r"^Environment=(.+)$", unit_text, re.M):
        env.update(kv.split("=", 1) for kv in line.split())
    return exec_start, env


def test_daemon_runs_as_the_unit_starts_it(board_root, broker, assets, tmp_path):
    """Same ExecStart, Environment, config paths; an unprivileged user with no new privileges;
    /opt, /etc/edgeward and /var/lib/edgeward mapped from the installed tree in a private mount namespace."""
    for tool in ("unshare", "setpriv"):
        _need(tool)
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root here")
    root = tmp_path / "root"
    shutil.copytree(board_root, root, symlinks=True)
    # The installer ran with --root; on a board it runs at / and the venv's scripts point at
    # /opt/edgeward/venv/bin/python. Make the copy look exactly like that.
    old_prefix = f"#!{board_root}/opt/edgeward/venv/bin/python".encode()
    for script in (root / "opt" / "edgeward" / "venv" / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes().startswith(old_prefix):
            script.write_bytes(script.read_bytes().replace(old_prefix, b"#!/opt/edgeward/venv/bin/python", 1))
    cfg = root / "etc" / "edgeward" / "agent.yaml"
    cfg.write_text(cfg.read_text().replace("mqtt://10.1.2.3:1883", broker.url).replace("interval_s: 10", "interval_s: 1"))
    state, overlay = tmp_path / "state", tmp_path / "overlay"
    for d in (state, overlay / "up", overlay / "work"):
        d.mkdir(parents=True)
    os.chown(state, 65534, 65534)
    exec_start, unit_env = _unit_service_settings((root / "etc/systemd/system/edgeward-agent.service").read_text())
    assert exec_start[:2] == ["/opt/edgeward/venv/bin/edgeward", "agent"]
    sock = NotifySocket(tmp_path, abstract=True)  # no file-system permissions between root and the agent
    setup = (f"mount -t tmpfs tmpfs /opt && mkdir /opt/edgeward && mount --bind {root}/opt/edgeward /opt/edgeward && "
             f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/up,workdir={overlay}/work /etc && "
             f"mkdir -p /etc/edgeward && mount --bind {root}/etc/edgeward /etc/edgeward && "
             f"mount -t tmpfs tmpfs /var/lib && mkdir /var/lib/edgeward && mount --bind {state} /var/lib/edgeward && "
             f'exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs "$@"')
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "4000000",
           "JOURNAL_STREAM": "8:1", **unit_env}
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", *exec_start],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sock.with_key("READY") or proc.poll() is not None, timeout=60, what="READY=1")
        assert proc.poll() is None, proc.stderr.read()
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            states = wait_for(lambda: [s for s in fleet.devices() if s.online], timeout=10, what="birth")
            assert states[0].device == "pi-42" and states[0].budget_mb == 512
            reply = fleet.deploy(assets.v1, "pi-42")
            assert reply.data["version"] == 1
            assert fleet.infer("pi-42", "digits", {"input": assets.eval_inputs(2)})["version"] == 1
        assert (state / "models" / "digits" / "current").is_symlink()
        assert (state / "models" / "digits" / "v1").stat().st_uid == 65534  # written by the unprivileged user
        wait_for(lambda: sock.with_key("WATCHDOG"), timeout=5, what="watchdog ping")
        r = subprocess.run([str(EDGEWARD), "agent", "status", "--store", str(state)], capture_output=True, text=True)
        assert r.returncode == 0 and "running" in r.stdout and "digits" in r.stdout, r.stdout + r.stderr
        row = next(line.split() for line in r.stdout.splitlines() if line.startswith("digits"))
        assert row[:3] == ["digits", "1", "CPU"]  # the execution provider it runs on
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert sock.with_key("STOPPING")
        r = subprocess.run([str(EDGEWARD), "agent", "status", "--store", str(state)], capture_output=True, text=True)
        assert r.returncode == 3 and "NOT running" in r.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert not Path("/etc/edgeward").exists()  # the host was never touched
