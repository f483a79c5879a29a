#!/usr/bin/env python3
"""Rollout benchmark: a staged rollout (canary, waves, soak gates) to 200 agents on this machine.

Every simulated board is a real `agent.daemon.Agent` (the same protocol code as on a board:
its own MQTT session, store, budget, onnxruntime model, self-test), run 50 to a process so
the machine's cores are used. Target (issue 5): the whole rollout in <= 60 s.

    .venv/bin/python scripts/bench_rollout.py [--agents 200] [--procs 4] [--soak 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import MqttConfig, load_config  # noqa: E402
from agent.devbroker import LocalBroker  # noqa: E402
from agent.fleet import Fleet  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.rollout import Gates, Rollout  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402

TARGET_S = 60.0


def serve_agents(first: int, count: int, broker: str, work: Path, bundle: str, pub: str) -> None:
    """Child process: run `count` agents until SIGTERM."""
    import logging

    # 50 simulated boards share this process: load cryptography once, so their signature checks
    # run here instead of each starting a checker process (a real board starts one per deploy)
    import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401

    from agent.daemon import Agent

    logging.basicConfig(level=logging.ERROR)
    agents, threads = [], []
    for i in range(first, first + count):
        cfg = load_config(None, {"mqtt.url": broker, "device.id": f"sim-{i:03d}", "device.groups": ["bench"],
                                 "store.path": str(work / "stores" / f"sim-{i:03d}"), "trust.keys": [pub],
                                 "memory.budget_mb": 100_000, "memory.reserve_mb": 0, "telemetry.interval_s": 0.5,
                                 "inference.workers": 1, "log_level": "error"})
        a = Agent(cfg)
        a.start(install=[bundle])
        t = threading.Thread(target=a.run, daemon=True)
        t.start()
        agents.append(a)
        threads.append(t)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for a in agents:
        a.request_stop()
    for a in agents:
        a.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--canary", default="5%")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--soak", type=float, default=2.0, help="seconds each wave is watched (telemetry every 0.5 s)")
    ap.add_argument("--serve", nargs=5, metavar=("FIRST", "COUNT", "BROKER", "WORKDIR", "BUNDLE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--pub", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        first, count, broker, work, bundle = args.serve
        serve_agents(int(first), int(count), broker, Path(work), bundle, args.pub)
        return 0

    from converters import zoo
    from converters.convert import ConvertOptions, convert_onnx

    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-rollout-"))
    procs: list[subprocess.Popen] = []
    broker = None
    try:
        print("preparing the digits CNN v1 and v2 bundles ...", file=sys.stderr, flush=True)
        key, pub, _ = generate_keypair(work / "signing")
        calib, evaluation = zoo.write_digits_npz(work)
        for v, epochs in ((1, 4), (2, 8)):
            zoo.build_digits_cnn(work / f"d{v}.onnx", epochs=epochs, seed=v)
            convert_onnx(work / f"d{v}.onnx", calib, work / f"digits-v{v}.ewb", key, evaluation,
                         ConvertOptions(name="digits", version=v))
        broker = LocalBroker(workdir=work / "broker").start()
        t0 = time.perf_counter()
        per = -(-args.agents // args.procs)
        for p in range(args.procs):
            first, count = p * per, min(per, args.agents - p * per)
            if count > 0:
                procs.append(subprocess.Popen([sys.executable, __file__, "--serve", str(first), str(count), broker.url,
                                               str(work), str(work / "digits-v1.ewb"), "--pub", str(pub)],
                                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        with Fleet(MqttConfig(url=broker.url)) as fleet:
            seen = [-1]

            def all_online() -> bool:
                up = {s.device for s in fleet.devices(quiet_s=1.0, max_wait_s=10) if s.online and s.models}
                if len(up) != seen[0]:
                    seen[0] = len(up)
                    missing = sorted({f"sim-{i:03d}" for i in range(args.agents)} - up)[:5]
                    print(f"  {len(up)}/{args.agents} agents online" + (f"; not yet {missing}" if missing else ""),
                          file=sys.stderr, flush=True)
                return len(up) >= args.agents
            wait_until(all_online, 300, f"{args.agents} agents online", 1.0)
            started_s = time.perf_counter() - t0
            targets = [s.device for s in fleet.devices(quiet_s=1.0, max_wait_s=10) if "bench" in s.groups]
            print(f"{len(targets)} agents online in {started_s:.0f} s; rolling out v2 ...", file=sys.stderr, flush=True)
            r = Rollout.create(fleet, work / "digits-v2.ewb", targets, args.canary, args.waves,
                               Gates(soak_s=args.soak, max_error_rate=0.05), work / "rollouts",
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
            t1 = time.perf_counter()
            state = r.run()
            rollout_s = time.perf_counter() - t1
            on_v2 = sum(1 for s in fleet.devices(quiet_s=1.0, max_wait_s=10)
                        if any(m.name == "digits" and m.version == 2 for m in s.models))
        rows = [[len(targets), " + ".join(str(len(w)) for w in state.waves), f"{args.soak:.0f}", state.state,
                 on_v2, f"{rollout_s:.1f}", "yes" if rollout_s <= TARGET_S and on_v2 == len(targets) else "NO"]]
        print(format_table(["agents", "waves (canary + ...)", "soak s/wave", "result", "on v2 after", "rollout s",
                            f"<= {TARGET_S:.0f} s"], rows, align="rlrlrrl"))
        print(f"\n{args.procs} processes of real Agent instances on 127.0.0.1; telemetry every 0.5 s; "
              f"each wave deploys 16 at a time, then soaks")
        return 0 if rows[0][-1] == "yes" else 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
