#!/usr/bin/env python3
"""Local API transport: a request's round trip to a model worker's socket, inline against
shared memory (agent/shm.py), side by side in one run: large requests (images from 192 kB
to 4.8 MB, 40-byte answers), then large answers (a 48 kB request, answers of 192 kB to
4.8 MB, as a segmentation or detection model gives).

The "model" is left out (it checks the input is finite and returns 10 numbers per row, or
the answer size asked for), so what is timed is what the agent adds: framing, the socket
or the region, the checks. The
server is agent/direct.py's DirectServer in a process of its own, as a model worker runs it;
the client is agent.client.LocalClient, once with shared memory (its default: used for
requests that do not fit the socket's send buffer) and once without, in alternating rounds.

    .venv/bin/python scripts/bench_local_api.py [--rounds 10] [--calls 100]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import shm  # noqa: E402
from agent.bundle import TensorSpec  # noqa: E402
from agent.client import LocalClient  # noqa: E402
from agent.direct import DirectServer  # noqa: E402
from agent.tables import format_table  # noqa: E402
from agent.tensors import from_numpy, to_numpy  # noqa: E402

SHAPES = [(128, 128, 3), (160, 160, 3), (224, 224, 3), (320, 320, 3), (640, 640, 3)]
ANSWER_KB = [192, 300, 588, 1200, 4800]


def _serve(path: str, shape: tuple, answer_floats: int, ready) -> None:
    def run(feeds):
        x = to_numpy(feeds[0])
        if not np.isfinite(x).all():
            raise ValueError("not finite")
        y = np.resize(x, (len(x), answer_floats)) if answer_floats else x.reshape(len(x), -1)[:, :10].copy()
        return [from_numpy("y", y)]

    DirectServer(path, 0o600, "m", 1, [TensorSpec("x", "float32", [-1, *shape])], run, spin_us=200)
    ready.set()
    time.sleep(3600)


def _compare(path: str, shape: tuple, answer_floats: int, rounds: int, calls: int) -> tuple[float, float, str]:
    """p50 round trip (µs) inline and with the client's default, and what the default used."""
    ready = mp.get_context("fork").Event()
    server = mp.get_context("fork").Process(target=_serve, args=(path, shape, answer_floats, ready), daemon=True)
    server.start()
    ready.wait(30)
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    clients = {"shared": LocalClient(path), "inline": LocalClient(path, shared_memory=False)}
    lat: dict[str, list] = {k: [] for k in clients}
    try:
        for c in clients.values():
            c._routes["m"] = path  # as the agent's route op answers for a stateless model
            for _ in range(20):
                c.infer("m", {"x": x})
        for _ in range(rounds):
            for k, c in clients.items():
                for _ in range(calls):
                    t0 = time.perf_counter()
                    c.infer("m", {"x": x})
                    lat[k].append((time.perf_counter() - t0) * 1e6)
        regions = clients["shared"]._regions()
        used = [use for use in ("requests", "answers") if isinstance(regions.get((path, use)), shm.Region)]
    finally:
        for c in clients.values():
            c.close()
        server.kill()
        server.join()
    inline, shared = (float(np.percentile(lat[k], 50)) for k in ("inline", "shared"))
    return inline, shared, "shared memory for " + " and ".join(used) if used else "inline"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds per size (default %(default)s)")
    ap.add_argument("--calls", type=int, default=100, help="requests per round (default %(default)s)")
    args = ap.parse_args()
    if not shm.available():
        print("this OS has no sealed memfds: the client always sends inline here")
        return 1
    probe = socket.socket(socket.AF_UNIX)
    sndbuf = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    probe.close()
    requests, answers = [], []
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-api-") as tmp:
        for shape in SHAPES:
            inline, shared, used = _compare(str(Path(tmp) / "m.sock"), shape, 0, args.rounds, args.calls)
            requests.append(["x".join(map(str, shape)), f"{np.prod(shape) * 4 / 1024:.0f}", used,
                             f"{inline:.0f}", f"{shared:.0f}", f"{shared / inline:.2f}x"])
        for kb in ANSWER_KB:
            inline, shared, used = _compare(str(Path(tmp) / "m.sock"), (64, 64, 3), kb * 256, args.rounds, args.calls)
            answers.append([f"{kb}", used, f"{inline:.0f}", f"{shared:.0f}", f"{shared / inline:.2f}x"])
    print(f"Round trip to a model worker's socket, batch 1, model left out (µs, p50 of {args.rounds * args.calls}, "
          f"alternating rounds); the socket's send buffer is {sndbuf // 1024} kB.\n")
    print("Large requests (float32 images), 40-byte answers:")
    print(format_table(["image", "request kB", "client default sends", "inline p50", "default p50", "default/inline"],
                       requests, align="lrlrrr"))
    print("\nLarge answers, 48 kB requests:")
    print(format_table(["answer kB", "client default", "inline p50", "default p50", "default/inline"],
                       answers, align="rlrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
