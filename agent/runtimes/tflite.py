"""TFLite models through ai-edge-litert (preferred) or tflite-runtime 2.14, whichever is installed.

Both expose the same Interpreter. Inputs whose batch axis is dynamic (shape_signature -1)
are resized to each request's size; the interpreter is re-allocated only when a shape
changes. An Interpreter must not run from two threads at once (thread_safe = False: the
worker serialises calls).
"""

from __future__ import annotations

import numpy as np

from ..errors import BundleError, InferenceError
from .base import Runtime


def interpreter_class():
    """(Interpreter class, package name): ai-edge-litert first, tflite-runtime as the fallback."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"


class TfliteRuntime(Runtime):
    name = "tflite"
    thread_safe = False

    def __init__(self, path: str, threads: int = 1):
        cls, self.package = interpreter_class()
        try:
            self._it = cls(model_path=path, num_threads=threads)
            self._it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{self.package} cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self._inputs = self._it.get_input_details()
        self._outputs = self._it.get_output_details()
        self._shapes = {d["index"]: tuple(d["shape"]) for d in self._inputs}

    @property
    def input_details(self) -> list[dict]:
        """The interpreter's own description of the inputs (shape signature, dtype, quantization)."""
        return self._inputs

    @property
    def output_details(self) -> list[dict]:
        return self._outputs

    def tensor_details(self) -> list[dict]:
        """Every tensor of the model, with its quantization (for tools that inspect a model)."""
        return self._it.get_tensor_details()

    def input_names(self) -> list[str]:
        return [d["name"] for d in self._inputs]

    def output_names(self) -> list[str]:
        return [d["name"] for d in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for d in self._inputs:
            arr = feeds[d["name"]]
            if tuple(arr.shape) != self._shapes[d["index"]]:
                self._it.resize_tensor_input(d["index"], list(arr.shape))
                self._shapes[d["index"]] = tuple(arr.shape)
                resized = True
        if resized:
            try:
                self._it.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(f"the model cannot take these shapes: {exc}") from exc
        for d in self._inputs:
            self._it.set_tensor(d["index"], np.ascontiguousarray(feeds[d["name"]]))
        self._it.invoke()
        return {d["name"]: self._it.get_tensor(d["index"]) for d in self._outputs}

    def close(self) -> None:
        self._it = None


def load(path: str, threads: int = 1, providers: list[str] | None = None) -> Runtime:  # noqa: ARG001
    return TfliteRuntime(path, threads)
