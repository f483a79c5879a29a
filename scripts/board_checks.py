#!/usr/bin/env python3
"""The checks of scripts/board-test.sh, run on the host against the emulated board, through MQTT only.

Emulation is hundreds of times slower than a real board, so nothing here times inference:
every check proves a behaviour, with timeouts generous enough for software emulation.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent import protocol  # noqa: E402
from agent.bundle import open_bundle, write_bundle  # noqa: E402
from agent.config import MqttConfig  # noqa: E402
from agent.errors import FleetError  # noqa: E402
from agent.fleet import Fleet  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.signing import load_private_key  # noqa: E402
from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402


class Board:
    """The host's MQTT view of the board: retained state, telemetry, and the test helper."""

    def __init__(self, url: str, device: str):
        self.device = device
        host, port = url.split("//")[1].split(":")
        self.states: list[dict] = []
        self.telemetry: list[dict] = []
        self.replies: queue.Queue = queue.Queue()
        self.helper_up = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="board-checks", protocol=paho.MQTTv5)
        c.on_connect = lambda *a: c.subscribe([(protocol.state_topic(device), 1), (protocol.telemetry_topic(device), 0),
                                               ("edgeward-boardtest/#", 1)])
        c.on_message = self._on_message
        c.connect(host, int(port))
        c.loop_start()
        self.client = c

    def _on_message(self, c, u, msg):
        if msg.topic == protocol.state_topic(self.device) and msg.payload:
            self.states.append({**json.loads(msg.payload), "_at": time.monotonic()})
        elif msg.topic == protocol.telemetry_topic(self.device):
            self.telemetry.append(json.loads(msg.payload))
        elif msg.topic == "edgeward-boardtest/hello" and msg.payload == b"up":
            self.helper_up.set()
        elif msg.topic == "edgeward-boardtest/reply":
            self.replies.put(json.loads(msg.payload))

    def helper(self, action: str, timeout: float = 180) -> dict:
        if not self.helper_up.wait(timeout):
            raise AssertionError("the in-guest test helper never connected")
        while not self.replies.empty():
            self.replies.get()
        self.client.publish(f"edgeward-boardtest/cmd/{action}", b"", qos=1)
        reply = self.replies.get(timeout=timeout)
        assert reply["action"] == action
        return reply

    def show(self) -> dict:
        """`systemctl show` properties of the agent's unit, its cgroup's memory.max and its process line."""
        unit, cgroup, process = self.helper("show")["outputs"]
        props = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
        props["cgroup_memory_max"] = cgroup.strip()
        props["process"] = process.strip()
        return props


def wait_for(pred, timeout: float, what: str, interval: float = 1.0):
    return wait_until(pred, timeout, what, interval)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--device", default="board-01")
    ap.add_argument("--image-dir", required=True, help="the image folder holding signing.key")
    ap.add_argument("--budget-mb", type=int, default=200)
    ap.add_argument("--boot-timeout", type=float, default=900)
    args = ap.parse_args()
    image = Path(args.image_dir)
    work = Path(tempfile.mkdtemp(prefix="edgeward-board-checks-"))
    results: list[list] = []
    t_begin = time.monotonic()

    def check(name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:  # a failed check is reported, and the next ones still run
            detail, ok = f"{exc.__class__.__name__}: {exc}", False
        results.append([name, "PASS" if ok else "FAIL", f"{time.monotonic() - t0:.0f}", str(detail)[:110]])
        print(f"[{'PASS' if ok else 'FAIL'}] {name} ({time.monotonic() - t0:.0f} s) {detail}", flush=True)
        return ok

    board = Board(args.broker, args.device)
    fleet = Fleet(MqttConfig(url=args.broker))
    key = load_private_key(image / "signing.key")

    # models made on the host, as a user would, signed with the key the image trusts
    zoo.build_digits_cnn(work / "digits.onnx", epochs=8, seed=0)
    calib, evaluation = zoo.write_digits_npz(work)
    convert_onnx(work / "digits.onnx", calib, work / "digits-v1.ewb", image / "signing.key", evaluation,
                 ConvertOptions(name="digits", version=1))
    over = open_bundle(work / "digits-v1.ewb", verify_signature=False)
    with tempfile.TemporaryDirectory() as tmp:
        import tarfile
        with tarfile.open(work / "digits-v1.ewb") as tar:
            tar.extractall(tmp, filter="data")
        over.manifest.version, over.manifest.memory.load_mb = 2, 10_000.0
        write_bundle(work / "digits-v2-huge.ewb", over.manifest,
                     {n: Path(tmp) / n for n in over.manifest.files}, key)

    def booted():
        s = wait_for(lambda: [s for s in board.states if s.get("online")], args.boot_timeout, "the birth message")[-1]
        props = board.show()
        assert props["ActiveState"] == "active", props  # Type=notify: active only after READY=1
        user = props["process"].split()[0] if props["process"] else "?"
        assert user not in ("root", "0", "?"), props["process"]
        return f"online after {s['_at'] - t_begin:.0f} s; {s['hardware']['machine']}, python {s['hardware']['python']}, " \
               f"runtimes {','.join(s['runtimes'])}; unit {props['ActiveState']}/{props['SubState']} as user {user}"

    def telemetry():
        t = wait_for(lambda: board.telemetry, 120, "telemetry")[-1]
        return f"rss {t['rss_mb']} MB of {t['budget_mb']} MB"

    def deploy_and_infer():
        reply = fleet.deploy(work / "digits-v1.ewb", args.device, timeout=900)
        with np.load(evaluation) as d:
            x = d["input"][:8]
        got = fleet.infer(args.device, "digits", {"input": x}, timeout=300)
        host = _host_int8(work / "digits-v1.ewb", x)
        diff = float(np.abs(got["outputs"]["logits"] - host).max())
        same = (got["outputs"]["logits"].argmax(1) == host.argmax(1)).all()
        assert same and diff <= open_bundle(work / "digits-v1.ewb", verify_signature=False).manifest.selftest.atol, diff
        return f"v{reply.data['version']} self-test agreement {reply.data['self_test']['top1_agreement']}; " \
               f"8 predictions equal the host's (max abs diff {diff:.3g})"

    def over_budget():
        try:
            fleet.deploy(work / "digits-v2-huge.ewb", args.device, timeout=900)
        except FleetError as exc:
            assert "short by" in str(exc), exc
            got = fleet.infer(args.device, "digits", {"input": np.zeros((1, 1, 8, 8), np.float32)}, timeout=300)
            assert got["version"] == 1
            return "refused (" + str(exc).split("needs", 1)[-1].split(":")[0].strip() + "); v1 still serving"
        raise AssertionError("the over-budget bundle was accepted")

    def memory_max():
        props = board.show()
        want = args.budget_mb + max(128, args.budget_mb // 2)
        assert props["MemoryMax"] == str(want * 1024 * 1024), props
        assert props["cgroup_memory_max"] in (str(want * 1024 * 1024), "none"), props
        return f"MemoryMax={props['MemoryMax']} (budget {args.budget_mb} MB + margin), cgroup memory.max " \
               f"{props['cgroup_memory_max']}, MemoryHigh={props['MemoryHigh']}, DynamicUser={props['DynamicUser']}"

    def watchdog():
        before = board.show()
        pid, restarts = before["MainPID"], int(before["NRestarts"])
        n_states = len(board.states)
        t0 = time.monotonic()
        board.helper("sigstop")
        after = wait_for(lambda: (lambda p: p if int(p["NRestarts"]) > restarts and p["ActiveState"] == "active"
                                  and p["MainPID"] != pid else None)(board.show()), 600, "a watchdog restart",
                         interval=5)
        s = wait_for(lambda: [s for s in board.states[n_states:] if s.get("online") and s.get("models")], 600,
                     "the restarted agent's birth with its model")[-1]
        assert [m["version"] for m in s["models"]] == [1], s["models"]
        return f"SIGSTOP at pid {pid}; systemd restarted it as pid {after['MainPID']} (NRestarts " \
               f"{after['NRestarts']}) and it serves digits v1 again {time.monotonic() - t0:.0f} s later"

    def clean_stop():
        n_states = len(board.states)
        board.helper("stop")
        s = wait_for(lambda: [s for s in board.states[n_states:] if not s.get("online")], 300, "the offline state")[-1]
        assert s["models"], "got the last will, not the clean stop's state"
        props = board.show()
        assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
        return f"offline state with models {[m['name'] for m in s['models']]}; unit {props['ActiveState']}, " \
               f"result {props['Result']}"

    ok = check("service READY and birth message", booted)
    if ok:
        for name, fn in [("telemetry", telemetry), ("deploy, self-test, same result as host", deploy_and_infer),
                         ("over-budget bundle refused, old model serving", over_budget),
                         ("MemoryMax in force", memory_max),
                         ("watchdog restarts a wedged agent", watchdog),
                         ("systemctl stop publishes offline state", clean_stop)]:
            check(name, fn)
    print()
    print(format_table(["check", "result", "seconds", "detail"], results, align="llrl"))
    failed = [r for r in results if r[1] != "PASS"]
    if failed:
        try:
            print("\nagent journal from the board:\n" + board.helper("journal", timeout=60)["out"])
        except Exception as exc:
            print(f"(journal unavailable: {exc})")
    fleet.close()
    print(f"\n{len(results) - len(failed)} passed, {len(failed) + (0 if ok else 6)} failed")
    return 1 if failed or not ok else 0


def _host_int8(bundle: Path, x: np.ndarray) -> np.ndarray:
    import tarfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(bundle) as tar:
        tar.extract("model.onnx", tmp, filter="data")
        sess = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]


if __name__ == "__main__":
    sys.exit(main())
