"""FP32 model in, measured and signed INT8 bundle out.

Every input is checked before any work starts (the model, the data against the
model's inputs, the signing key), all intermediate files live in a temporary
folder, and the bundle is written by rename at the very end: a failed conversion
leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from agent import __version__
from agent.bundle import REFERENCE, Manifest, MemoryCost, SelfTest, write_bundle
from agent.errors import ConversionError
from agent.signing import load_private_key

from . import measure
from .data import MIN_CALIBRATION_SAMPLES, load_dataset
from .onnx_int8 import describe, int8_summary, load_onnx, quantize_static

REFERENCE_SAMPLES = 8
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    name: str | None = None
    version: int = 1
    per_channel: bool = True
    method: str = "minmax"
    exclude_nodes: list[str] = field(default_factory=list)
    threads: int = 1
    description: str = ""


def _model_name(name: str | None, path: Path) -> str:
    raw = name or path.stem
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", raw).strip("-._")[:64]
    if not clean:
        raise ConversionError(f"cannot make a model name from {raw!r}", "pass --name NAME")
    return clean


def _reference_indices(outputs: np.ndarray, k: int) -> np.ndarray:
    """Samples for the board's self-test: for classifiers, ones with a clear top-1 margin,
    so a legitimate last-bit difference between CPUs cannot flip the winning class."""
    n = len(outputs)
    if outputs.ndim == 2 and outputs.shape[1] > 1 and n > k:
        top2 = np.sort(outputs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        clear = np.flatnonzero(margin >= np.median(margin))
        return clear[:k]
    return np.arange(min(n, k))


def convert_onnx(model_path: str | Path, calibration: str | Path, out_path: str | Path,
                 key_path: str | Path | None = None, evaluation: str | Path | None = None,
                 options: ConvertOptions | None = None, progress: Progress | None = None) -> dict:
    """Quantize an FP32 ONNX model to static INT8 QDQ, measure it against FP32, write a bundle."""
    opts = options or ConvertOptions()
    say = progress or (lambda stage, done, total: None)
    model_path, out_path = Path(model_path), Path(out_path)
    if opts.version < 1:
        raise ConversionError(f"--version {opts.version}: versions start at 1")
    if out_path.suffix != ".ewb":
        raise ConversionError(f"output {out_path} should end in .ewb", "name the bundle like model.ewb")
    key = load_private_key(key_path) if key_path else None
    model = load_onnx(model_path)
    inputs, _ = describe(model)
    calib = load_dataset(calibration, inputs, "calibration", MIN_CALIBRATION_SAMPLES)
    evalset = load_dataset(evaluation, inputs, "evaluation") if evaluation else calib
    name = _model_name(opts.name, model_path)

    with tempfile.TemporaryDirectory(prefix="edgeward-convert-") as tmp:
        int8_path = Path(tmp) / "model.onnx"
        quantize_static(model_path, int8_path, calib.inputs, per_channel=opts.per_channel, method=opts.method,
                        exclude_nodes=opts.exclude_nodes, progress=lambda d, t: say("calibrating", d, t))
        q_inputs, q_outputs = describe(load_onnx(int8_path))
        fp32, int8 = measure.session(model_path, opts.threads), measure.session(int8_path, opts.threads)
        say("measuring quality", 0, 3)
        ref_out = measure.run_all(fp32, evalset.inputs)
        q_out = measure.run_all(int8, evalset.inputs)
        quality = measure.compare(ref_out, q_out, evalset.labels)
        quality["evaluated_on"] = "evaluation data" if evaluation else "calibration data (pass --eval for held-out data)"
        say("measuring latency", 1, 3)
        sample = evalset.take(slice(0, 1))
        latency = {"fp32": measure.latency_ms(fp32, sample), "int8": measure.latency_ms(int8, sample)}
        say("measuring memory", 2, 3)
        memory = measure.memory_cost(int8_path, sample, threads=opts.threads)
        say("measuring memory", 3, 3)

        first_out = q_outputs[0].name
        idx = _reference_indices(q_out[first_out], REFERENCE_SAMPLES)
        ref_arrays = {f"input.{k}": v[idx] for k, v in evalset.inputs.items()}
        ref_arrays.update({f"expected.{k}": v[idx] for k, v in q_out.items()})
        ref_arrays.update({f"fp32.{k}": v[idx] for k, v in ref_out.items()})
        ref_path = Path(tmp) / REFERENCE
        np.savez(ref_path, **ref_arrays)
        expected = q_out[first_out][idx].astype(np.float64)
        atol = max(1e-4, 0.05 * float(expected.max() - expected.min()))

        sizes = {"fp32_bytes": model_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}
        sizes["int8_vs_fp32"] = round(sizes["int8_bytes"] / sizes["fp32_bytes"], 4)
        manifest = Manifest(
            name=name, version=opts.version, format="onnx", model_file="model.onnx", runtime="onnxruntime",
            precision="int8", inputs=q_inputs, outputs=q_outputs,
            memory=MemoryCost(load_mb=memory["load_mb"], runtime_mb=memory["runtime_mb"],
                              measured_on=memory["measured_on"]),
            selftest=SelfTest(atol=round(atol, 6), min_top1_agreement=1.0),
            quality={**quality, "latency_p50_ms_fp32": latency["fp32"]["p50"],
                     "latency_p50_ms_int8": latency["int8"]["p50"], **sizes,
                     "calibration": f"{opts.method}, {'per-channel' if opts.per_channel else 'per-tensor'}, "
                                    f"{len(calib)} samples"},
            description=opts.description,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            producer=f"edgeward {__version__} (onnxruntime.quantization QDQ)",
        )
        say("packing", 0, 1)
        write_bundle(out_path, manifest, {"model.onnx": int8_path, REFERENCE: ref_path}, key)
        say("packing", 1, 1)
        graph = int8_summary(int8_path)

    return {"bundle": str(out_path), "name": name, "version": opts.version, "signed": key is not None,
            "bundle_bytes": out_path.stat().st_size, **sizes, "quality": quality, "latency_ms": latency,
            "memory": memory, "graph": graph, "calibration_samples": len(calib), "evaluation_samples": len(evalset)}
