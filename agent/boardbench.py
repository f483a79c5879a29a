"""`edgeward bench --model NAME`: how fast a model serves on this board, through the running agent.

The converter's report times a model on the workstation; what a user flashing a board wants
to know is how it does there, in the runtime and serving mode the agent gives it, with the
local API in between. This sends 1-row requests of random data of the model's input shapes
through agent.client.LocalClient (the path a local app takes) for a few seconds at each
number of concurrent callers, and prints rows/s and latency percentiles per step, so the
gain of a batched mode under load, or the cost of a second caller, can be read off.
A stateful model gets one stream per caller (reset afterwards).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .client import LocalClient
from .errors import EdgewardError, ModelNotFound


def random_inputs(specs: list[dict], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row of each input: the batch axis (-1) as 1, values in the dtype's usual range."""
    out = {}
    for spec in specs:
        shape = [1 if d < 0 else d for d in spec["shape"]] or [1]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            out[spec["name"]] = rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype)
    return out


def bench(socket_path: str, model: str, clients: list[int], seconds: float) -> dict:
    """{"model", "version", "mode", "steps": [{"clients", "requests", "errors", "rows_per_s", "p50_ms", ...}]}."""
    with LocalClient(socket_path) as probe:
        served = {m["name"]: m for m in probe.models()}
    if model not in served:
        raise ModelNotFound(f"no model named {model!r} is serving; serving: {', '.join(sorted(served)) or 'none'}",
                            "deploy it first, or pick one of those")
    info = served[model]
    stateful = info["mode"] == "stateful"
    rng = np.random.default_rng(0)
    feeds = random_inputs(info["inputs"], rng)
    steps = []
    with LocalClient(socket_path) as client:
        client.infer(model, feeds, stream="bench-warm" if stateful else None)  # first call: route, connect
        for n in clients:
            steps.append(_step(client, model, feeds, n, seconds, stateful))
        if stateful:
            for i in range(max(clients)):
                client.reset(model, f"bench-{i}")
            client.reset(model, "bench-warm")
    return {"model": model, "version": info["version"], "mode": info["mode"], "seconds": seconds, "steps": steps}


def _step(client: LocalClient, model: str, feeds: dict, n: int, seconds: float, stateful: bool) -> dict:
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    start = threading.Barrier(n + 1)

    def call(i: int) -> None:
        stream = f"bench-{i}" if stateful else None
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                client.infer(model, feeds, stream=stream)
            except EdgewardError as exc:  # counted, and the first few shown
                errors.append(str(exc))
                continue
            latencies[i].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.array([x for per in latencies for x in per], dtype=float)
    pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat.size else (lambda q: None)
    return {"clients": n, "requests": int(lat.size), "errors": len(errors), "first_errors": errors[:3],
            "rows_per_s": round(lat.size / elapsed, 1), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99)}


def render(result: dict) -> str:
    from .tables import format_table

    rows = [[s["clients"], s["requests"], s["errors"], f"{s['rows_per_s']:.0f}", s["p50_ms"] or "-",
             s["p95_ms"] or "-", s["p99_ms"] or "-"] for s in result["steps"]]
    head = (f"{result['model']} v{result['version']} ({result['mode']}), 1-row requests through the local API, "
            f"{result['seconds']:g} s per step:\n")
    lines = [head + format_table(["CLIENTS", "REQUESTS", "ERRORS", "ROWS/S", "P50 MS", "P95 MS", "P99 MS"], rows,
                                 align="rrrrrrr")]
    for s in result["steps"]:
        for e in s["first_errors"]:
            lines.append(f"  {s['clients']} clients: {e}")
    return "\n".join(lines)
