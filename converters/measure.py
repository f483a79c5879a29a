"""Measuring what quantization cost: quality against the FP32 model, latency, and memory.

Memory is measured in a fresh Python process (numpy imported first, as the agent
has it) so the figure is what a board's agent will see when it loads the model:
`runtime_mb` for importing the runtime, `load_mb` for the session plus a first run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.errors import ConversionError, runtime_message


def session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # failures come back as exceptions, which the converter words itself
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"onnxruntime cannot load {Path(path).name}: {str(exc).splitlines()[0]}") from exc


class TfliteSession:
    """A .tflite model behind the few calls of onnxruntime's session the measurements use,
    through the agent's own TFLite backend (ai-edge-litert or tflite-runtime). Models with
    int8 I/O are fed quantized inputs and their outputs dequantized, so quality is always
    compared in real values."""

    class _Arg:
        def __init__(self, d: dict):
            sig = d.get("shape_signature")
            shape = list(sig if sig is not None and len(sig) else d["shape"])
            self.name, self.shape = d["name"], [("batch" if v == -1 else int(v)) for v in shape]
            self.dtype = np.dtype(d["dtype"])
            self.scale, self.zero_point = (float(d["quantization"][0]), int(d["quantization"][1]))

    def __init__(self, path: str | Path, threads: int = 1):
        from agent.runtimes.tflite import TfliteRuntime

        try:
            self.rt = TfliteRuntime(str(path), threads)
        except Exception as exc:
            raise ConversionError(f"LiteRT cannot load {Path(path).name}: {str(exc).splitlines()[0]}") from exc
        self._in = [self._Arg(d) for d in self.rt.input_details]
        self._out = [self._Arg(d) for d in self.rt.output_details]

    def get_inputs(self):
        return self._in

    def get_outputs(self):
        return self._out

    def run(self, names, feeds: dict[str, np.ndarray]):
        out = self.rt.run(self.quantize_inputs(feeds))
        result = []
        for a in self._out:
            y = out[a.name]
            if a.dtype == np.int8:
                y = ((y.astype(np.float32) - a.zero_point) * a.scale).astype(np.float32)
            result.append(y)
        by_name = dict(zip([a.name for a in self._out], result))
        return [by_name[n] for n in (names or by_name)]

    def specs(self):
        from agent.bundle import TensorSpec

        def spec(a):
            shape = [-1 if d == "batch" else d for d in a.shape]
            q = a.dtype == np.int8
            return TensorSpec(a.name, a.dtype.name, shape, batch_axis=0 if shape and shape[0] == -1 else None,
                              scale=a.scale if q else None, zero_point=a.zero_point if q else None)

        return [spec(a) for a in self._in], [spec(a) for a in self._out]

    def raw_run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs as the model gives them (int8 for int8 I/O): what the board's self-test compares."""
        from agent.reference import run_in_batches

        return run_in_batches(self.rt.run, feeds, fixed_batch(self))

    def quantize_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Real-valued inputs as the model takes them: quantized for int8 inputs, else as given."""
        out = {}
        for a in self._in:
            x = feeds[a.name]
            if a.dtype == np.int8 and x.dtype != np.int8:
                x = np.clip(np.round(x / a.scale) + a.zero_point, -128, 127).astype(np.int8)
            out[a.name] = x
        return out


def run_all(sess, inputs: dict[str, np.ndarray], batch: int = 64, what: str = "the model") -> dict[str, np.ndarray]:
    """Run the whole dataset through a session in batches; a model whose batch size is fixed
    takes that many rows at a time, the last run padded (every sample is measured)."""
    from agent.reference import run_in_batches

    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(names, sess.run(names, feeds)))
        except ConversionError:  # a stream's step that failed, already named (converters/stateful.py)
            raise
        except Exception as exc:  # the runtime's own types: a model that runs at one batch size but not another, ...
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ConversionError(f"{what} fails on the data ({shapes}): {runtime_message(exc)}",
                                  "check that the data matches the model's inputs; a model exported for one "
                                  "batch size must declare it (a fixed first axis), not a dynamic one") from exc

    fixed = fixed_batch(sess)
    if fixed:
        return run_in_batches(run, inputs, fixed)
    n = len(next(iter(inputs.values())))
    parts: dict[str, list] = {k: [] for k in names}
    for i in range(0, n, batch):
        for k, o in run({k: v[i:i + batch] for k, v in inputs.items()}).items():
            parts[k].append(o)
    return {k: np.concatenate(v) for k, v in parts.items()}


def fixed_batch(sess) -> int | None:
    """The batch size a session's first input is fixed at, or None when it is free."""
    first = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    return first if isinstance(first, int) and first > 0 else None


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            labels: np.ndarray | None = None, detections: list[str] | None = None) -> dict:
    """Agreement of top-1 with the FP32 model, max/mean abs error, and accuracy when labels are given.
    The errors are those of the output that lost most (its max error the largest share of its
    range), named as `worst_output` where there are several: a detector's scores can break while
    its boxes, listed first, hold. Top-1 and accuracy are the first output's (a classifier's scores).
    A detector's final detections (`detections`: its boxes, classes, scores and count outputs) are
    matched as detections instead (agent/detections.py): the share matched, their mean IoU and
    their scores' largest error."""
    if detections:
        from agent.detections import agreement

        return {**agreement(reference, candidate, detections), "samples": int(len(reference[detections[3]]))}
    out: dict = {}

    def lost(name: str) -> float:
        ref, cand = reference[name].astype(np.float64), candidate[name].astype(np.float64)
        if not ref.size:
            return 0.0
        err, span = float(np.abs(ref - cand).max()), float(ref.max() - ref.min())
        return err / span if span > 0 else math.inf if err > 0 else 0.0

    worst = max(reference, key=lost)
    ref, cand = reference[worst].astype(np.float64), candidate[worst].astype(np.float64)
    err = np.abs(ref - cand)
    out["max_abs_err"] = round(float(err.max()), 5)
    out["mean_abs_err"] = round(float(err.mean()), 5)
    out["output_range"] = round(float(ref.max() - ref.min()), 5)
    if len(reference) > 1:
        out["worst_output"] = worst
    first = next(iter(reference))
    ref, cand = reference[first].astype(np.float64), candidate[first].astype(np.float64)
    if ref.ndim in (2, 3) and ref.shape[-1] > 1:  # a class per sample, or per position of a sequence (OCR's CTC)
        out["top1_agreement"] = round(float((ref.argmax(-1) == cand.argmax(-1)).mean()), 5)
        if ref.ndim == 3:
            out["positions"] = int(ref.shape[0] * ref.shape[1])
        if labels is not None and ref.ndim == 2:
            n = len(ref)
            out["accuracy_fp32"] = round(float((ref.argmax(1) == labels[:n]).mean()), 5)
            out["accuracy_int8"] = round(float((cand.argmax(1) == labels[:n]).mean()), 5)
            out["accuracy_drop_pp"] = round(100 * (out["accuracy_fp32"] - out["accuracy_int8"]), 3)
    out["samples"] = int(len(ref))
    return out


def latency_ms(sessions: dict, sample: dict[str, np.ndarray], runs: int = 200, rounds: int = 10,
               warmup: int = 20) -> dict[str, dict]:
    """Single-request latency of each session on this CPU, p50 and p95 over `runs` calls each.

    The sessions take turns in `rounds` short blocks, so that a slow patch of the machine
    (another process, frequency changes: common on shared and small hosts) falls on all of
    them alike instead of on whichever ran second; the FP32/INT8 ratio is what is compared."""
    names = {k: [o.name for o in sess.get_outputs()] for k, sess in sessions.items()}
    for k, sess in sessions.items():
        for _ in range(warmup):
            sess.run(names[k], sample)
    per_round = max(1, runs // rounds)
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            sess.run(names[k], sample)  # the first call after the other model ran warms this one's caches
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(names[k], sample)
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: {"p50": round(float(np.percentile(t, 50)), 4), "p95": round(float(np.percentile(t, 95)), 4)}
            for k, t in times.items()}


_MEMORY_PROBE = r"""
import json, sys
import numpy as np
import psutil
proc = psutil.Process()
base = proc.memory_info().rss
from agent import runtimes
if sys.argv[4] == "onnxruntime":
    import onnxruntime
else:
    from agent.runtimes.tflite import interpreter_class
    interpreter_class()
imported = proc.memory_info().rss
sess = runtimes.open_model(sys.argv[4], sys.argv[1], threads=int(sys.argv[3]))
with np.load(sys.argv[2]) as sample:
    feeds = {k: sample[k] for k in sample.files}
for _ in range(3):
    sess.run(feeds)
loaded = proc.memory_info().rss
# the high-water mark of this address space (ru_maxrss would carry the converter's own over exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"runtime_mb": (imported - base) / 2**20, "load_mb": (loaded - imported) / 2**20,
                  "peak_mb": max(peak, loaded) / 2**20}))
"""


def memory_cost(model_path: str | Path, sample: dict[str, np.ndarray], threads: int = 1, repeats: int = 3,
                runtime: str = "onnxruntime") -> dict:
    """RSS cost of importing the runtime and of loading + running this model, in a fresh process,
    through the agent's own runtime backend (as a board's model worker runs it).

    The largest of `repeats` measurements is kept: the budget must not be surprised.
    """
    with tempfile.TemporaryDirectory(prefix="edgeward-mem-") as tmp:
        sample_path = Path(tmp) / "sample.npz"
        np.savez(sample_path, **sample)
        results = []
        for _ in range(repeats):
            proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model_path), str(sample_path), str(threads),
                                   runtime],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise ConversionError(f"measuring the model's memory failed: {proc.stderr.strip().splitlines()[-1:]}")
            results.append(json.loads(proc.stdout))
    return {"load_mb": round(max(r["load_mb"] for r in results), 2),
            "runtime_mb": round(max(r["runtime_mb"] for r in results), 2),
            "peak_mb": round(max(r["peak_mb"] for r in results), 2),
            "measured_on": f"{platform.machine()} {platform.system()}, python {platform.python_version()}"}
