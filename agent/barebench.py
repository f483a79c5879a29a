"""The bare runtime, the reference of every side-by-side benchmark of the agent.

The agent's targets are ratios against "a minimal script that calls the same runtime on the
same model with the same threads". This is that script, kept in one place for
scripts/bench_agent.py (on the workstation) and `edgeward bench --bare` (on a board).

It runs as `python -c SCRIPT` in a process of its own that imports numpy and the runtime and
nothing else: importing the agent's modules, or psutil (2 MB), into the reference would add
their memory to it and flatter the agent. It reads its memory from /proc/self itself, once
after loading the model and running it at batch 1 (what the agent's worker holds when it
serves 1-row requests) and again after the batched runs (their arena is larger). The first
reading comes before the latency loop: a fast model's loop keeps hundreds of thousands of
timings (10-16 MB of Python floats for the digits CNN in 3 s), which are the script's own.
Random inputs come from os.urandom, not numpy.random, whose import alone costs 6.5 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys, time
import numpy as np
numpy_random = "numpy.random" in sys.modules  # numpy 1.x imports it itself: then the worker holds it too
a = json.loads(sys.argv[1])

def memory():
    rss = pss = None
    try:
        with open("/proc/self/status") as f:
            rss = next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))
        with open("/proc/self/smaps_rollup") as f:
            pss = next(int(l.split()[1]) / 1024 for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration):
        pass
    if rss is None:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rss, pss if pss is not None else rss

def noise(shape):  # uniform [0, 1) from os.urandom: numpy.random would add 6.5 MB the agent's worker lacks
    import os
    n = max(1, int(np.prod(shape)))
    return (np.frombuffer(os.urandom(4 * n), np.uint32) / 2.0**32).reshape(shape)

given = dict(np.load(a["inputs"])) if a.get("inputs") else {}

def value(name, pos, shape, dtype, rows):
    x = given.get(name, list(given.values())[pos] if pos < len(given) else None)  # by name, else by position
    # a free axis: the rows asked for (the first), else the given array's size (audio of any length), else 1
    shape = [rows if i == 0 and not (isinstance(d, int) and d > 0) else
             d if isinstance(d, int) and d > 0 else x.shape[i] if x is not None and i < x.ndim else 1
             for i, d in enumerate(shape)] or [1]
    if x is not None:
        return np.resize(x.astype(dtype), shape)
    if dtype.kind == "f":
        return noise(shape).astype(dtype)
    if dtype.kind == "b":
        return (noise(shape) < 0.5).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -128), min(info.max, 127) + 1
    return np.floor(lo + noise(shape) * (hi - lo)).astype(dtype)

def rows_of(shape, rows):
    first = shape[0] if shape else 1
    return first if isinstance(first, int) and first > 0 else rows

if a["runtime"] == "onnxruntime":
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = a["threads"]
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(a["path"], sess_options=o, providers=a.get("providers") or ["CPUExecutionProvider"])
    kinds = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
    specs = [(i.name, i.shape, np.dtype(kinds.get(i.type[7:-1], i.type[7:-1]))) for i in s.get_inputs()]
    def runner(rows):
        feeds = {n: value(n, pos, shape, dt, rows) for pos, (n, shape, dt) in enumerate(specs)}
        return lambda: s.run(None, feeds), rows_of(specs[0][1], rows)
    package = "onnxruntime " + ort.__version__
else:
    try:
        from ai_edge_litert.interpreter import Interpreter
        package = "ai-edge-litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
        package = "tflite-runtime"
    it = Interpreter(model_path=a["path"], num_threads=a["threads"])
    ins, outs = it.get_input_details(), [d["index"] for d in it.get_output_details()]
    def runner(rows):
        feeds = []
        for pos, d in enumerate(ins):
            sig = [int(x) for x in d.get("shape_signature", d["shape"])]
            x = value(d["name"], pos, sig, np.dtype(d["dtype"]), rows)
            it.resize_tensor_input(d["index"], list(x.shape))
            feeds.append((d["index"], x))
        it.allocate_tensors()
        def run():
            for i, x in feeds:
                it.set_tensor(i, x)
            it.invoke()
            return [it.get_tensor(o) for o in outs]
        return run, rows_of([int(x) for x in ins[0].get("shape_signature", ins[0]["shape"])], rows)

one, _ = runner(1)
for _ in range(50):
    one()
rss, pss = memory()  # before the timing loop: its list of latencies is the script's, not the model's
lat, end = [], time.perf_counter() + a["seconds"]
while time.perf_counter() < end:
    t0 = time.perf_counter(); one(); lat.append((time.perf_counter() - t0) * 1000)
p50 = float(np.percentile(lat, 50))
del lat
rates = {}
for b in a["batches"]:
    run, n = runner(b)
    run()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a["seconds"]:
        run(); done += n
    rates[str(b)] = {"rows": n, "rows_per_s": done / (time.perf_counter() - t0)}
brss, bpss = memory()
print(json.dumps({"package": package, "p50_ms": p50, "rss_mb": rss, "pss_mb": pss,
                  "batches": rates, "batched_rss_mb": brss, "batched_pss_mb": bpss,
                  "foreign": sorted(m for m in ("psutil", "agent", "converters") + (() if numpy_random else ("numpy.random",))
                                    if m in sys.modules)}))
"""


def run_bare(runtime: str, path: str, threads: int = 1, seconds: float = 3.0, batches: list[int] | None = None,
             inputs: str | None = None, providers: list[str] | None = None, python: str = sys.executable) -> dict:
    """Time `path` in the bare runtime ("onnxruntime" or "tflite") in a fresh process.

    Returns {"package", "p50_ms" (batch 1), "rss_mb"/"pss_mb" (after loading and the batch-1 runs),
    "batches": {"B": {"rows", "rows_per_s"}}, "batched_rss_mb"/"batched_pss_mb"}. A model whose
    batch axis is fixed runs at its own batch size ("rows"). `inputs`: an .npz of arrays by input
    name, repeated to each batch's rows; random values of the inputs' dtypes otherwise.
    """
    args = {"runtime": runtime, "path": path, "threads": threads, "seconds": seconds,
            "batches": list(batches or []), "inputs": inputs, "providers": providers}
    done = subprocess.run([python, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=120 + seconds * (2 + len(args["batches"])))
    if done.returncode != 0:
        from .errors import EdgewardError

        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgewardError(f"the bare {runtime} run of {path} failed: {last}",
                            "check that the runtime is installed for this python and can load the file")
    return json.loads(done.stdout.strip().splitlines()[-1])
