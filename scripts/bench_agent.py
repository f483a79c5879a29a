#!/usr/bin/env python3
"""Agent benchmark: the agent's local API against a minimal script that calls the same runtime
on the same model with the same threads, side by side in one run.

Targets (issue 4), per model:
  - p50 latency of batch-1 requests through the local API <= 1.10x the bare runtime + 0.2 ms;
  - under 32 concurrent clients, batched-mode throughput >= 2x streaming mode's and >= 0.9x the
    bare runtime's at the same batch size (32);
  - idle agent RSS (no model loaded) <= 35 MB;
  - RSS with one model loaded (agent + its worker) <= 1.15x the minimal script's.

The agent runs as its own process (`edgeward agent`) with a private Mosquitto, as on a board;
clients are 4 processes x 8 threads using agent.client.LocalClient.

    .venv/bin/python scripts/bench_agent.py [--seconds 4] [--models digits,mobilenet] [--format tflite]

--format tflite converts the models to INT8 TFLite and compares the agent with a minimal script
calling LiteRT (ai-edge-litert) instead of onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.barebench import run_bare  # noqa: E402
from agent.client import LocalClient  # noqa: E402
from agent.devbroker import LocalBroker  # noqa: E402
from agent.polling import wait_until  # noqa: E402
from agent.signing import generate_keypair  # noqa: E402
from agent.tables import format_table  # noqa: E402
from converters import zoo  # noqa: E402
from converters.convert import ConvertOptions, convert_onnx  # noqa: E402

def _client_proc(path: str, call, proc: int, threads: int, seconds: float, out: mp.Queue) -> None:
    client = LocalClient(path)
    counts = [0] * threads
    errors = []
    start = threading.Barrier(threads)

    def run(i: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            try:
                call(client, proc, i)
                counts[i] += 1
            except Exception as exc:  # counted and shown
                errors.append(str(exc))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((sum(counts), errors[:3]))


def concurrent_calls_per_s(path: str, call, seconds: float, procs: int = 4, threads: int = 8) -> tuple[float, list]:
    """Calls/s of `call(client, process index, thread index)` from procs x threads callers at
    once (forked: `call` may be any function), and the first errors."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_client_proc, args=(path, call, i, threads, seconds, q)) for i in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    elapsed = time.perf_counter() - t0
    return sum(r[0] for r in results) / max(elapsed - 0.2, seconds), [e for r in results for e in r[1]]


def concurrent_rows_per_s(path: str, model: str, x1: np.ndarray, seconds: float, procs: int = 4,
                          threads: int = 8) -> tuple[float, list]:
    return concurrent_calls_per_s(path, lambda client, p, i: client.infer(model, x1), seconds, procs, threads)


def tree_memory(pid: int) -> tuple[float, float]:
    """RSS and PSS (MB) of a process and its children (the agent and its model workers)."""
    rss = pss = 0.0
    proc = psutil.Process(pid)
    for p in [proc] + proc.children(recursive=True):
        m = p.memory_full_info()
        rss += m.rss
        pss += m.pss
    return rss / 2**20, pss / 2**20


class AgentProc:
    def __init__(self, work: Path, name: str, broker_url: str, pub: Path, bundle: Path | list[Path] | None,
                 serving: dict):
        self.store = work / f"store-{name}"
        self.socket = str(self.store / "agent.sock")
        cfg = work / f"{name}.yaml"
        cfg.write_text(json.dumps({"models": serving, "inference": {"threads": 1}}))
        cmd = [sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg), "--broker", broker_url,
               "--device-id", name, "--store", str(self.store), "--trust-key", str(pub), "--budget-mb", "4096",
               "--telemetry-interval", "10", "--log-level", "warning"]
        bundles = [] if bundle is None else bundle if isinstance(bundle, list) else [bundle]
        for b in bundles:
            cmd += ["--install", str(b)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        wait_until(lambda: Path(self.socket).exists() or self.proc.poll() is not None, 120, "the agent", 0.1)
        if self.proc.poll() is not None:
            raise SystemExit(f"the agent exited with {self.proc.returncode}")
        if bundles:  # the socket opens before the models load
            with LocalClient(self.socket) as c:
                wait_until(lambda: len(c.models()) == len(bundles), 120, "the models to load", 0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def p50_through_api(path: str, model: str, x1: np.ndarray, seconds: float) -> float:
    with LocalClient(path) as c:
        for _ in range(50):
            c.infer(model, x1)
        lat, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            c.infer(model, x1)
            lat.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(lat, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement (default %(default)s)")
    ap.add_argument("--models", default="digits,mobilenet,wide",
                    help="which of digits (tiny CNN), mobilenet (depthwise-separable CNN, 128x128), wide (MLP, 10 MB) "
                         "(default %(default)s)")
    ap.add_argument("--format", choices=["onnx", "tflite"], default="onnx",
                    help="INT8 ONNX in onnxruntime, or INT8 TFLite in LiteRT (default %(default)s)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-agent-"))
    ok = True
    try:
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        say("preparing: INT8 bundles of the models ...")
        key, pub, _ = generate_keypair(work / "signing")
        calib, evaluation = zoo.write_digits_npz(work)
        calib_flat, eval_flat = zoo.write_digits_npz(work / "flat", flat=True)
        models = {}
        if "digits" in args.models:
            zoo.build_digits_cnn(work / "digits.onnx")
            models["digits"] = (work / "digits.onnx", calib, evaluation, "input")
        if "mobilenet" in args.models:
            zoo.build_mobilenet_like(work / "mobilenet.onnx", size=128)
            img_calib, img_eval = zoo.write_image_npz(work / "images", size=128)
            models["mobilenet"] = (work / "mobilenet.onnx", img_calib, img_eval, "image")
        if "wide" in args.models:
            zoo.build_wide_mlp(work / "wide.onnx", hidden=2240)  # ~10 MB INT8: batching pays off
            models["wide"] = (work / "wide.onnx", calib_flat, eval_flat, "features")
        broker = LocalBroker(workdir=work / "broker").start()
        lat_rows, tput_rows, mem_rows = [], [], []
        try:
            idle = AgentProc(work, "idle", broker.url, pub, None, {})
            time.sleep(2.0)
            idle_rss, idle_pss = tree_memory(idle.proc.pid)
            idle.stop()
            for name, (fp32, cal, ev, input_name) in models.items():
                bundle = work / f"{name}.ewb"
                convert_onnx(fp32, cal, bundle, key, ev, ConvertOptions(name=name, format=args.format,
                                                                        allow_worse=True))
                with np.load(ev) as d:
                    x = d[input_name][:32].astype(np.float32)
                np.savez(work / f"{name}-x.npz", **{input_name: x[:1]})  # what the clients send; the bare script repeats it for its batches
                model_file = work / f"{name}-int8.{args.format}"
                import tarfile

                with tarfile.open(bundle) as tar:
                    model_file.write_bytes(tar.extractfile(f"model.{args.format}").read())
                say(f"{name}: bare runtime ...")
                bare = run_bare("tflite" if args.format == "tflite" else "onnxruntime", str(model_file), 1,
                                args.seconds, [32], inputs=str(work / f"{name}-x.npz"))
                bare["rows_per_s"] = bare["batches"]["32"]["rows_per_s"]
                say(f"{name}: agent, streaming mode ...")
                streaming = AgentProc(work, f"{name}-s", broker.url, pub, bundle, {})
                try:
                    p50 = p50_through_api(streaming.socket, name, x[:1], args.seconds)
                    loaded_rss, loaded_pss = tree_memory(streaming.proc.pid)
                    s_rate, s_err = concurrent_rows_per_s(streaming.socket, name, x[:1], args.seconds)
                finally:
                    streaming.stop()
                say(f"{name}: agent, batched mode ...")
                batched = AgentProc(work, f"{name}-b", broker.url, pub, bundle,
                                    {name: {"mode": "batched", "max_batch": 32, "max_delay_ms": 2}})
                try:
                    b_rate, b_err = concurrent_rows_per_s(batched.socket, name, x[:1], args.seconds)
                    batched_rss, _ = tree_memory(batched.proc.pid)  # after batches of up to 32 rows ran
                finally:
                    batched.stop()
                for e in s_err + b_err:
                    say(f"  client error: {e}")
                limit = bare["p50_ms"] * 1.10 + 0.2
                lat_ok = p50 <= limit
                tput_ok = b_rate >= 2 * s_rate and b_rate >= 0.9 * bare["rows_per_s"] and not (s_err or b_err)
                mem_ok = loaded_rss <= 1.15 * bare["rss_mb"]
                ok &= lat_ok and tput_ok
                lat_rows.append([name, f"{bare['p50_ms']:.3f}", f"{p50:.3f}", f"{p50 / bare['p50_ms']:.2f}x",
                                 f"{limit:.3f}", "yes" if lat_ok else "NO"])
                tput_rows.append([name, f"{s_rate:.0f}", f"{b_rate:.0f}", f"{bare['rows_per_s']:.0f}",
                                  f"{b_rate / s_rate:.2f}x", f"{b_rate / bare['rows_per_s']:.2f}x",
                                  "yes" if tput_ok else "NO"])
                mem_rows.append([name, f"{bare['rss_mb']:.1f}", f"{loaded_rss:.1f}", f"{loaded_rss / bare['rss_mb']:.2f}x",
                                 f"{bare['pss_mb']:.1f}", f"{loaded_pss:.1f}", f"{loaded_pss / bare['pss_mb']:.2f}x",
                                 "yes" if mem_ok else "NO", f"{bare['batched_rss_mb']:.1f}", f"{batched_rss:.1f}"])
        finally:
            broker.stop()
        print(f"INT8 {args.format} models, {'LiteRT' if args.format == 'tflite' else 'onnxruntime'}, 1 thread.\n")
        print("Latency, batch-1 requests one after another (ms):")
        print(format_table(["model", "bare p50", "agent p50", "ratio", "limit 1.10x+0.2", "met"], lat_rows,
                           align="lrrrrl"))
        print("\nThroughput, 32 concurrent clients sending 1 row each (rows/s); bare runs batches of 32:")
        print(format_table(["model", "streaming", "batched", "bare b=32", "batched/streaming", "batched/bare",
                            "met (>=2x, >=0.9x)"], tput_rows, align="lrrrrrl"))
        print(f"\nMemory (MB): idle agent, no model: RSS {idle_rss:.1f} (target <= 35: "
              f"{'yes' if idle_rss <= 35 else 'NO'}), PSS {idle_pss:.1f}")
        print(format_table(["model", "bare RSS", "agent+worker RSS", "ratio", "bare PSS", "agent+worker PSS",
                            "ratio", "RSS <= 1.15x", "bare after b=32", "batched mode RSS"], mem_rows,
                           align="lrrrrrrlrr"))
        print("(bare: after loading the model and its batch-1 runs, read from /proc by the script itself; "
              "agent+worker: streaming mode after its batch-1 runs; bare after b=32 and batched mode RSS: after "
              "their batched runs, with one interpreter per batch in flight for TFLite)")
        ok &= idle_rss <= 35
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
