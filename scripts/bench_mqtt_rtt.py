#!/usr/bin/env python3
"""Inference round trip over MQTT (fleet client -> broker -> agent -> broker -> client) on loopback,
with the broker's TCP_NODELAY off (Mosquitto's default) and on, side by side in one run.

Both edgeward ends always disable Nagle on their own sockets; this shows what the broker's
setting adds. Model: the digits CNN (batch 1), the agent as its own process.

    .venv/bin/python scripts/bench_mqtt_rtt.py [--requests 300]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import MqttConfig  # noqa: E402
from agent.devbroker import LocalBroker  # noqa: E402
from agent.fleet import Fleet  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402


def measure(work: Path, bundle: Path, pub: Path, nodelay: bool, n: int) -> np.ndarray:
    broker = LocalBroker(workdir=work / f"broker-{nodelay}", tcp_nodelay=nodelay).start()
    store = work / f"store-{nodelay}"
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--broker", broker.url, "--device-id", "rtt",
                              "--store", str(store), "--trust-key", str(pub), "--install", str(bundle),
                              "--log-level", "warning"], cwd=ROOT)
    try:
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            wait_until(lambda: [s for s in fleet.devices() if s.online and s.models], 60, "the agent", 0.5)
            x = np.zeros((1, 1, 8, 8), np.float32)
            for _ in range(10):
                fleet.infer("rtt", "digits", {"input": x})
            out = np.empty(n)
            for i in range(n):
                t = time.perf_counter()
                fleet.infer("rtt", "digits", {"input": x})
                out[i] = (time.perf_counter() - t) * 1000
            return out
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx

    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-rtt-"))
    try:
        key, pub, _ = generate_keypair(work / "k")
        calib, evaluation = zoo.write_digits_npz(work)
        zoo.build_digits_cnn(work / "d.onnx", epochs=2)
        convert_onnx(work / "d.onnx", calib, work / "d.ewb", key, evaluation, ConvertOptions(name="digits"))
        off = measure(work, work / "d.ewb", pub, False, args.requests)
        on = measure(work, work / "d.ewb", pub, True, args.requests)
        rows = [[label, f"{np.percentile(v, 50):.2f}", f"{np.percentile(v, 95):.2f}", f"{np.percentile(v, 99):.2f}"]
                for label, v in (("Mosquitto default (set_tcp_nodelay false)", off),
                                 ("Mosquitto set_tcp_nodelay true", on))]
        print(format_table(["broker", "p50 ms", "p95 ms", "p99 ms"], rows, align="lrrr"))
        print(f"\nratio p50 default / nodelay: {np.percentile(off, 50) / np.percentile(on, 50):.0f}x "
              f"({args.requests} sequential batch-1 requests each)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
