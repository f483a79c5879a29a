"""Inference runtimes behind one small interface; each is imported only when a model needs it.

The idle daemon's memory is a feature: importing onnxruntime costs ~40 MB of RSS,
so `open_model` imports a backend module on first use, never at agent start.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from ..errors import RuntimeMissing
from .base import Runtime

# manifest "runtime" -> (module implementing it, the Python packages that provide it, in order of preference)
_BACKENDS = {
    "onnxruntime": ("agent.runtimes.onnx", ("onnxruntime",)),
    "tflite": ("agent.runtimes.tflite", ("ai_edge_litert", "tflite_runtime")),
}


def _installed(packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if importlib.util.find_spec(p) is not None), None)


def available() -> list[str]:
    """Runtimes installed on this device (found, not imported)."""
    return [name for name, (_, packages) in _BACKENDS.items() if _installed(packages)]


def is_imported(runtime: str) -> bool:
    """Whether the runtime's library is already in this process's memory."""
    backend = _BACKENDS.get(runtime)
    return backend is not None and any(p in sys.modules for p in backend[1])


def open_model(runtime: str, model_path: str, threads: int = 1, providers: list[str] | None = None) -> Runtime:
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
    return module.load(model_path, threads=threads, providers=providers)


__all__ = ["Runtime", "available", "is_imported", "open_model"]
