"""`edgeward bench --model NAME`: how fast a model serves on this board, through the running agent.

The converter's report times a model on the workstation; what a user flashing a board wants
to know is how it does there, in the runtime and serving mode the agent gives it, with the
local API in between. This sends 1-row requests (a sample of the bundle's self-test data, or
random data of the model's input shapes) through agent.client.LocalClient (the path a local
app takes) for a few seconds at each number of concurrent callers, and prints rows/s and
latency percentiles per step, so the
gain of a batched mode under load, or the cost of a second caller, can be read off.
A stateful model gets one stream per caller (reset afterwards). With `--image photo.jpg`
each request is that photo, decoded and prepared on the board as the bundle says: how many
camera frames a second the board keeps up with.

With `--bare` it also times the same model file in the bare runtime, with the agent's thread
count, in a minimal process of its own (agent/barebench.py), and prints the two side by side:
latency at batch 1, rows/s at the batch size the agent would run (1 in streaming mode, the
callers up to max_batch in batched mode), and the memory of the agent and the model's worker
against the bare script's. These are the agent's own targets (docs/BENCHMARKS.md), measured on
the board they matter on.
"""

from __future__ import annotations

import os
import tempfile
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


def reference_inputs(info: dict) -> dict[str, np.ndarray] | None:
    """The bundle's self-test inputs as the model takes them (a stateful model's state and whole
    windows included), where this process can read them beside the installed model."""
    from . import reference
    from .bundle import REFERENCE

    path = os.path.join(os.path.dirname(info["file"]), REFERENCE) if info.get("file") else None
    if not path or not os.access(path, os.R_OK):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [k[len("input."):] for k in data.files if k.startswith("input.")]
        return reference.load(path, names, info["name"])[0]
    except (OSError, ValueError, EdgewardError):  # unusable: the model's own self-test says so elsewhere
        return None


def sample_inputs(info: dict, fed: dict[str, np.ndarray] | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample of what callers send: from the bundle's self-test data `fed` (reference_inputs)
    where this process could read it (real shapes and values: a model with other free axes,
    audio of any length say, fails on made-up ones), random data of the input shapes otherwise."""
    if fed is None or any(s["name"] not in fed for s in info["inputs"]):
        return random_inputs(info["inputs"], rng)
    out = {}
    for spec in info["inputs"]:
        x = fed[spec["name"]]
        x = x[:1] if np.ndim(x) else x
        k = (info.get("context") or {}).get(spec["name"])
        if k and x.ndim:  # the reference holds whole windows; callers send the new samples
            x = x[..., k:]
        out[spec["name"]] = x
    return out


def bench(socket_path: str, model: str, clients: list[int], seconds: float, bare: bool = False,
          image: bytes | None = None) -> dict:
    """{"model", "version", "mode", "steps": [{"clients", "requests", "errors", "rows_per_s", "p50_ms", ...}]},
    with `bare`: and "bare" (the bare runtime's figures), "memory" (MB) and each step's "bare_rows_per_s".
    With `image` (an encoded photo's bytes), each request sends that photo for the board to
    prepare, as a camera pipeline's message is: decoding counts, as it does for the camera."""
    if image is not None and bare:
        raise EdgewardError("--bare times tensors in the bare runtime; with --image the board also decodes",
                            "leave out --bare, or --image")
    with LocalClient(socket_path) as probe:
        served = {m["name"]: m for m in probe.models()}
    if model not in served:
        raise ModelNotFound(f"no model named {model!r} is serving; serving: {', '.join(sorted(served)) or 'none'}",
                            "deploy it first, or pick one of those")
    info = served[model]
    if bare:  # before the agent's steps: a bench that cannot finish should not start
        _check_readable(info)
    stateful = info["mode"] == "stateful"
    rng = np.random.default_rng(0)
    fed = reference_inputs(info)
    feeds = sample_inputs(info, fed, rng)
    steps = []
    with LocalClient(socket_path) as client:
        if image is not None:
            send = lambda i: client.infer_image(model, image)  # noqa: E731
            client.infer_image(model, image)  # first call: a photo the board cannot take fails here, once
        else:
            send = lambda i: client.infer(model, feeds, stream=f"bench-{i}" if stateful else None)  # noqa: E731
            client.infer(model, feeds, stream="bench-warm" if stateful else None)  # first call: route, connect
        for n in clients:
            steps.append(_step(send, n, seconds))
        if stateful:
            for i in range(max(clients)):
                client.reset(model, f"bench-{i}")
            client.reset(model, "bench-warm")
    result = {"model": model, "version": info["version"], "mode": info["mode"], "seconds": seconds, "steps": steps,
              "max_delay_ms": info.get("max_delay_ms", 0.0), "image_bytes": len(image) if image is not None else None}
    if bare:
        result.update(_against_bare(socket_path, info, steps, seconds, fed))
    return result


def _against_bare(socket_path: str, info: dict, steps: list[dict], seconds: float,
                  fed: dict[str, np.ndarray] | None) -> dict:
    """The bare runtime on the same file and threads, and both sides' memory (after their runs);
    fed with the bundle's self-test inputs `fed` where there are some (real shapes for free
    axes, and a stateful model's state)."""
    from .barebench import run_bare

    agent_pid = _peer_pid(socket_path)
    batched = info["mode"] == "batched"
    for s in steps:
        s["bare_batch"] = min(s["clients"], info.get("max_batch", 1)) if batched else 1
    agent_mb = {"agent": _rss_mb(agent_pid), "worker": _rss_mb(info.get("pid"))}
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        inputs = None
        if fed:
            inputs = os.path.join(tmp, "inputs.npz")
            np.savez(inputs, **fed)
        ref = run_bare(info["runtime"], info["file"], int(info.get("threads", 1)), seconds,
                       sorted({s["bare_batch"] for s in steps}), inputs=inputs, providers=info.get("providers") or None)
    for s in steps:
        s["bare_rows_per_s"] = round(ref["batches"][str(s["bare_batch"])]["rows_per_s"], 1)
    compared = ref["batched_rss_mb"] if batched and any(s["bare_batch"] > 1 for s in steps) else ref["rss_mb"]
    total = sum(v for v in agent_mb.values() if v is not None)
    return {"bare": {"package": ref["package"], "threads": int(info.get("threads", 1)),
                     "p50_ms": round(ref["p50_ms"], 4), "rss_mb": round(compared, 1)},
            "memory": {**{k: (round(v, 1) if v is not None else None) for k, v in agent_mb.items()},
                       "total": round(total, 1), "ratio": round(total / compared, 3) if compared else None}}


def _check_readable(info: dict) -> None:
    """The bare run reads the installed model file itself."""
    if "file" not in info:
        raise EdgewardError("this agent does not say where its models run", "upgrade the agent on this board")
    if not os.access(info["file"], os.R_OK):
        raise EdgewardError(f"cannot read {info['file']}, the model file the agent runs",
                            "the store is the agent's alone: run it with sudo, or as the agent's user")


def _peer_pid(socket_path: str) -> int | None:
    """The pid of the process listening on `socket_path`, as the kernel gives it (Linux)."""
    import socket
    import struct

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(socket_path)
            return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED on this OS
        return None


def _rss_mb(pid: int | None) -> float | None:
    """A process's resident memory from /proc (readable for any user's process), None if gone."""
    try:
        with open(f"/proc/{int(pid)}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, TypeError, ValueError):
        return None


def _step(send, n: int, seconds: float) -> dict:
    """`n` callers each calling send(their index) back to back for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    start = threading.Barrier(n + 1)

    def call(i: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                send(i)
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

    bare = result.get("bare")
    rows, head = [], ["CLIENTS", "REQUESTS", "ERRORS", "ROWS/S", "P50 MS", "P95 MS", "P99 MS"]
    for s in result["steps"]:
        row = [s["clients"], s["requests"], s["errors"], f"{s['rows_per_s']:.0f}", s["p50_ms"] or "-",
               s["p95_ms"] or "-", s["p99_ms"] or "-"]
        if bare:
            row += [f"{s['bare_rows_per_s']:.0f} (b={s['bare_batch']})", f"{s['rows_per_s'] / s['bare_rows_per_s']:.2f}x"]
        rows.append(row)
    if bare:
        head += ["BARE ROWS/S", "AGENT/BARE"]
    what = (f"one {result['image_bytes'] / 1024:.0f} kB photo per request, prepared on the board"
            if result.get("image_bytes") else "1-row requests")
    title = (f"{result['model']} v{result['version']} ({result['mode']}), {what} through the local API, "
             f"{result['seconds']:g} s per step:\n")
    lines = [title + format_table(head, rows, align="r" * len(head))]
    if bare:
        lines += _bare_lines(result)
    for s in result["steps"]:
        for e in s["first_errors"]:
            lines.append(f"  {s['clients']} clients: {e}")
    return "\n".join(lines)


def _bare_lines(result: dict) -> list[str]:
    bare, mem = result["bare"], result["memory"]
    out = [f"bare runtime: {bare['package']}, {bare['threads']} thread(s), the same model file, in a process of its own"]
    one = next((s for s in result["steps"] if s["clients"] == 1 and s["p50_ms"]), None)
    if one:
        extra = one["p50_ms"] - bare["p50_ms"]
        if result["mode"] == "batched":  # a lone caller waits out max_delay_ms for others to join its batch
            judged = f"batched mode waits up to {result.get('max_delay_ms', 0):g} ms to fill a batch; " \
                     "latency is judged in streaming mode"
        else:
            judged = "target <= 1.10x + 0.2 ms: " + ("met" if one["p50_ms"] <= 1.10 * bare["p50_ms"] + 0.2
                                                     else "not met")
        out.append(f"latency p50 at batch 1: bare {bare['p50_ms']:.3f} ms, through the agent {one['p50_ms']:.3f} ms "
                   f"({one['p50_ms'] / bare['p50_ms']:.2f}x, +{extra:.3f} ms; {judged})")
    if mem.get("ratio") is not None:
        parts = " + ".join(f"{k} {v:.1f}" for k, v in mem.items() if k in ("agent", "worker") and v is not None)
        out.append(f"memory (RSS): {parts} = {mem['total']:.1f} MB; bare script {bare['rss_mb']:.1f} MB: "
                   f"{mem['ratio']:.2f}x (target <= 1.15x: {'met' if mem['ratio'] <= 1.15 else 'not met'})")
    return out
