#!/usr/bin/env python3
"""Host side of scripts/arm64-smoke.sh: drive the arm64 agent (under qemu-user) over MQTT."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.config import MqttConfig  # noqa: E402
from agent.devbroker import LocalBroker  # noqa: E402
from agent.fleet import Fleet  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402

# onnxruntime reads /proc/cpuinfo to pick kernels; under qemu-user it would see the x86 host and crash
FAKE_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n" for i in range(2))


def host_outputs(bundle: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from converters.measure import TfliteSession

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(bundle) as tar:
        if "model.tflite" in tar.getnames():
            tar.extract("model.tflite", tmp, filter="data")
            return TfliteSession(Path(tmp) / "model.tflite").run(None, {"input": x})[0]
        tar.extract("model.onnx", tmp, filter="data")
        return ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rootfs", required=True, type=Path)
    args = ap.parse_args()
    rootfs = args.rootfs
    rows = []
    work = rootfs / "tmp" / "smoke"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.monotonic()
    key, pub, _ = generate_keypair(work / "signing")
    zoo.build_digits_cnn(work / "digits_v1.onnx", epochs=6, seed=0)
    zoo.build_digits_cnn(work / "digits_v2.onnx", epochs=10, seed=1)
    calib, evaluation = zoo.write_digits_npz(work)
    for v in (1, 2):
        convert_onnx(work / f"digits_v{v}.onnx", calib, work / f"digits-v{v}.ewb", key, evaluation,
                     ConvertOptions(name="digits", version=v))
    convert_onnx(work / "digits_v2.onnx", calib, work / "digits-v3.ewb", key, evaluation,  # INT8 TFLite
                 ConvertOptions(name="digits", version=3, format="tflite"))
    rows.append(["bundles made and signed on the host (x86_64)", f"{time.monotonic() - t:.0f}"])
    (work / "cpuinfo").write_text(FAKE_CPUINFO)
    with np.load(evaluation) as d:
        x = d["input"][:16]
    broker = LocalBroker(workdir=work / "broker").start()
    inner = ["/opt/edgeward/venv/bin/edgeward", "agent", "--broker", broker.url, "--device-id", "arm64-smoke",
             "--store", "/tmp/smoke/store", "--trust-key", "/tmp/smoke/signing.pub",
             "--install", "/tmp/smoke/digits-v1.ewb", "--budget-mb", "512", "--telemetry-interval", "2"]
    script = (f'mount -t proc proc "{rootfs}/proc" && mount --bind "{work}/cpuinfo" "{rootfs}/proc/cpuinfo" && '
              f'exec chroot "{rootfs}" "$@"')
    t = time.monotonic()
    agent = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *inner],
                             stderr=open(work / "agent.log", "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    failed = False
    try:
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            state = wait_until(lambda: [s for s in fleet.devices() if s.online], 600, "the arm64 agent's birth", 1)[0]
            assert state.hardware.machine == "aarch64", state.hardware
            rows.append([f"agent up on {state.hardware.machine}, python {state.hardware.python}, "
                         f"runtimes {', '.join(state.runtimes)}; v1 verified and self-tested", f"{time.monotonic() - t:.0f}"])
            t = time.monotonic()
            got = fleet.infer("arm64-smoke", "digits", {"input": x}, timeout=300)["outputs"]["logits"]
            want = host_outputs(work / "digits-v1.ewb", x)
            diff = float(np.abs(got - want).max())
            assert (got.argmax(1) == want.argmax(1)).all(), (got.argmax(1), want.argmax(1))
            rows.append([f"16 inferences over MQTT = the host's predictions (max abs diff {diff:.3g})",
                         f"{time.monotonic() - t:.0f}"])
            t = time.monotonic()
            reply = fleet.deploy(work / "digits-v2.ewb", "arm64-smoke", timeout=600)
            assert reply.data["version"] == 2 and reply.data["self_test"]["top1_agreement"] == 1.0, reply.data
            assert fleet.infer("arm64-smoke", "digits", {"input": x[:1]}, timeout=300)["version"] == 2
            rows.append(["deploy v2 over MQTT: verified, self-tested, switched", f"{time.monotonic() - t:.0f}"])
            t = time.monotonic()
            reply = fleet.deploy(work / "digits-v3.ewb", "arm64-smoke", timeout=600)
            assert reply.data["version"] == 3 and reply.data["self_test"]["top1_agreement"] == 1.0, reply.data
            got = fleet.infer("arm64-smoke", "digits", {"input": x}, timeout=300)["outputs"]["logits"]
            want = host_outputs(work / "digits-v3.ewb", x)
            assert (got.argmax(1) == want.argmax(1)).all(), (got.argmax(1), want.argmax(1))
            rows.append([f"deploy v3, INT8 TFLite: self-tested in arm64 LiteRT, 16 inferences = the host's "
                         f"(max abs diff {float(np.abs(got - want).max()):.3g})", f"{time.monotonic() - t:.0f}"])
            t = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(120) == 0, "the agent did not exit cleanly"
            assert wait_until(lambda: [s for s in fleet.devices() if not s.online and s.models], 30, "offline state")
            rows.append(["SIGTERM: clean exit, offline state published", f"{time.monotonic() - t:.0f}"])
    except Exception as exc:  # any failure is reported in the table
        failed = True
        rows.append([f"FAILED: {exc.__class__.__name__}: {exc}"[:150], "-"])
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        broker.stop()
    print(format_table(["arm64 smoke check (qemu-user, software emulation: times are not board times)", "seconds"],
                       rows, align="lr"))
    if failed:
        print("\nagent log:\n" + (work / "agent.log").read_text()[-4000:])
        print("\n0 passed, 1 failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
