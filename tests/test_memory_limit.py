"""The RAM budget holds under a real kernel limit: the agent runs in a cgroup v1 memory
controller capped at budget + margin, takes load from local apps and MQTT while models are
deployed, rolled back and refused, and is never OOM-killed. (Needs root and cgroup v1's
memory controller, as on this machine and the CI; a board gets the same from the unit's
MemoryMax.)"""

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.client import LocalClient
from agent.config import MqttConfig
from agent.errors import FleetError
from agent.fleet import Fleet

from conftest import repack
from mqttkit import wait_for

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
BUDGET_MB, MARGIN_MB = 200, 64
pytestmark = pytest.mark.integration


@pytest.fixture
def memory_cgroup():
    if os.geteuid() != 0 or not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and the cgroup v1 memory controller")
    cg = CGROUP_V1 / f"edgeward-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    limit = (BUDGET_MB + MARGIN_MB) << 20
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    if (cg / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
        (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    (cg / "memory.swappiness").write_text("0")
    yield cg
    for pid in (cg / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    wait_for(lambda: not (cg / "cgroup.procs").read_text().split(), timeout=10, what="cgroup empty")
    cg.rmdir()


def _in_cgroup(cg: Path, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *argv], **kw)


def _oom_kills(cg: Path) -> int:
    fields = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", 0))


def test_the_limit_is_real(memory_cgroup):
    """A process that ignores the budget is killed by the kernel here: the test below could fail."""
    hog = _in_cgroup(memory_cgroup, [sys.executable, "-c",
                                     f"b = bytearray({(BUDGET_MB + MARGIN_MB + 64) << 20}); b[::4096] = b'x' * len(b[::4096])"])
    assert hog.wait(60) == -9
    assert _oom_kills(memory_cgroup) >= 1


def test_the_agent_stays_inside_its_budget_under_load_and_model_churn(memory_cgroup, broker, assets, tmp_path):
    store = tmp_path / "store"
    agent = _in_cgroup(memory_cgroup, [
        sys.executable, "-m", "agent.cli", "agent", "--broker", broker.url, "--device-id", "pi-limit",
        "--store", str(store), "--trust-key", str(assets.pub), "--install", str(assets.v1),
        "--budget-mb", str(BUDGET_MB), "--telemetry-interval", "1", "--log-level", "warning"], stderr=subprocess.PIPE)
    stop, errors, served = threading.Event(), [], [0]
    x = assets.eval_inputs(4)
    try:
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            wait_for(lambda: [s for s in fleet.devices() if s.online and s.models], timeout=60, what="agent up")

            def local_load():
                with LocalClient(str(store / "agent.sock")) as c:
                    while not stop.is_set():
                        try:
                            c.infer("digits", x)
                            served[0] += 1
                        except Exception as exc:  # counted: a restart-free agent answers every request
                            errors.append(repr(exc))

            threads = [threading.Thread(target=local_load) for _ in range(4)]
            for t in threads:
                t.start()
            huge = repack(assets.v2, tmp_path / "huge.ewb", assets.key,
                          manifest_edit=lambda m: (setattr(m, "version", 9), setattr(m.memory, "load_mb", 4000.0)))
            for _ in range(3):  # each deploy holds the old worker and a shadow worker at once
                assert fleet.deploy(assets.v2, "pi-limit", chunk_size=8192, timeout=120).data["version"] == 2
                fleet.infer("pi-limit", "digits", {"input": x})
                assert fleet.rollback("pi-limit", "digits").data["version"] == 1
                with pytest.raises(FleetError, match="short by"):
                    fleet.deploy(huge, "pi-limit", chunk_size=8192, timeout=60)
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(30)
            assert agent.poll() is None, agent.stderr.read().decode()[-2000:]
            answer = fleet.infer("pi-limit", "digits", {"input": x})
            assert answer["version"] == 1 and answer["outputs"]["logits"].shape == (4, 10)
    finally:
        stop.set()
        agent.terminate()
        rc = agent.wait(30)
    assert _oom_kills(memory_cgroup) == 0
    assert rc == 0
    assert errors == [] and served[0] > 50
    peak_mb = int((memory_cgroup / "memory.max_usage_in_bytes").read_text()) >> 20
    print(f"peak {peak_mb} MB of {BUDGET_MB + MARGIN_MB}, {served[0]} local requests served")
    assert peak_mb <= BUDGET_MB + MARGIN_MB
