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

# manifest "runtime" -> (module implementing it, the Python module whose import costs memory)
_BACKENDS = {
    "onnxruntime": ("agent.runtimes.onnx", "onnxruntime"),
}


def available() -> list[str]:
    """Runtimes installed on this device (found, not imported)."""
    return [name for name, (_, dist) in _BACKENDS.items() if importlib.util.find_spec(dist) is not None]


def is_imported(runtime: str) -> bool:
    """Whether the runtime's library is already in memory (so loading pays no import cost)."""
    backend = _BACKENDS.get(runtime)
    return backend is not None and backend[1] in sys.modules


def open_model(runtime: str, model_path: str, threads: int = 1) -> Runtime:
    backend = _BACKENDS.get(runtime)
    if backend is None:
        raise RuntimeMissing(f"runtime {runtime!r} is not supported by this agent",
                             f"supported: {', '.join(_BACKENDS)}")
    module_name, dist = backend
    if importlib.util.find_spec(dist) is None:
        raise RuntimeMissing(f"the model needs {runtime!r}, which is not installed on this device",
                             "pip install 'edgeward[device]'")
    module = importlib.import_module(module_name)
    return module.load(model_path, threads=threads)


__all__ = ["Runtime", "available", "is_imported", "open_model"]
