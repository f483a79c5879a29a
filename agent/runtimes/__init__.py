"""Inference runtimes behind one small interface; each is imported only when a model needs it.

The idle daemon's memory is a feature: importing onnxruntime costs ~40 MB of RSS,
so `open_model` imports a backend module on first use, never at agent start.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

from ..errors import RuntimeMissing
from .base import Runtime

# manifest "runtime" -> (module implementing it, the Python packages that provide it, in order of preference)
_BACKENDS = {
    "onnxruntime": ("agent.runtimes.onnx", ("onnxruntime",)),
    "tflite": ("agent.runtimes.tflite", ("ai_edge_litert", "tflite_runtime")),
}


# every Python package that provides a runtime, by module name
PACKAGES = tuple(p for _, packages in _BACKENDS.values() for p in packages)


def _installed(packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if importlib.util.find_spec(p) is not None), None)


def available() -> list[str]:
    """Runtimes installed on this device (found, not imported)."""
    return [name for name, (_, packages) in _BACKENDS.items() if _installed(packages)]


# manifest "runtime" -> the distributions that may provide it, in the order `_BACKENDS` prefers their modules
# (a board's own onnxruntime build has a name of its own: onnxruntime-gpu on a Jetson)
_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-qnn"),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
}


@functools.cache
def versions() -> dict[str, str]:
    """Each installed runtime and what provides it ("onnxruntime": "onnxruntime-gpu 1.17.0"), from
    package metadata, without importing a runtime: for the fleet, which plans deploys by it."""
    from importlib import metadata

    found = {}
    for runtime, dists in _DISTRIBUTIONS.items():
        for dist in dists:
            try:
                found[runtime] = f"{dist} {metadata.version(dist)}"
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def is_imported(runtime: str) -> bool:
    """Whether the runtime's library is already in this process's memory."""
    backend = _BACKENDS.get(runtime)
    return backend is not None and any(p in sys.modules for p in backend[1])


def runs_at_once(threads: int) -> int:
    """How many runs of `threads` intra-op threads each this machine's cores take (1 to 4)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // max(1, threads)))


def copies_for(runtime: str, batched: bool, in_flight: int) -> int:
    """Interpreters to keep of one model. Only TFLite needs more than one to run batches side
    by side, and only when the config asks for that many batches in flight: each copy costs
    its own activation arena (+46 MB at batch 32 for the MobileNet-style benchmark model, for
    +15 % throughput on a 2-core host whose clients share the cores; docs/BENCHMARKS.md), so by
    default a board keeps one and gathers the next batch while it runs."""
    if runtime != "tflite" or not batched:
        return 1
    return max(1, in_flight)


def open_model(runtime: str, model_path: str, threads: int = 1, providers: list[str] | None = None,
               copies: int = 1) -> Runtime:
    """Load a model; `copies` lets a runtime that runs one call at a time (TFLite) run that many."""
    backend = _BACKENDS.get(runtime)
    if backend is None:
        raise RuntimeMissing(f"runtime {runtime!r} is not supported by this agent",
                             f"supported: {', '.join(_BACKENDS)}")
    module_name, packages = backend
    if _installed(packages) is None:
        raise RuntimeMissing(f"the model needs {runtime!r}, which is not installed on this device",
                             f"pip install {' or '.join(p.replace('_', '-') for p in packages)} "
                             "(edgeward[device] brings ai-edge-litert and onnxruntime)")
    module = importlib.import_module(module_name)
    return module.load(model_path, threads=threads, providers=providers, copies=copies)


__all__ = ["Runtime", "available", "copies_for", "is_imported", "open_model", "runs_at_once"]
