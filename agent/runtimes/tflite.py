"""TFLite models through ai-edge-litert (preferred) or tflite-runtime 2.14, whichever is installed.

Both expose the same Interpreter. Inputs whose batch axis is dynamic (shape_signature -1)
are resized to each request's size; an interpreter is re-allocated only when a shape
changes. An Interpreter must not run from two threads at once, but its invoke() releases
the GIL: so the runtime keeps `copies` interpreters of the model and each run borrows a
free one. With one copy, runs queue for it; with two, two batches run on two cores at once
(the weights are the mmapped file, so a copy costs its activation arena and packed weights).
"""

from __future__ import annotations

import queue

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


def _check_free_axes(d: dict, shape: tuple) -> None:
    """Only axes the model leaves free (-1 in its shape signature) may be resized: a layer whose
    output shape is a constant of the model (TRANSPOSE_CONV's) would answer for the first rows
    of a larger batch only."""
    sig = d.get("shape_signature")
    sig = list(sig) if sig is not None and len(sig) else list(d["shape"])
    if len(sig) != len(shape) or any(want >= 0 and want != got for want, got in zip(sig, shape)):
        fixed = [int(v) if v >= 0 else "any" for v in sig]
        raise InferenceError(f"input {d['name']!r} takes shape {fixed}, not {list(shape)}",
                             "send rows in batches of the model's fixed size")


class _Copy:
    """One interpreter of the model, with the input shapes it is allocated for."""

    def __init__(self, it, inputs: list[dict], outputs: list[dict]):
        self.it, self.inputs, self.outputs = it, inputs, outputs
        self.shapes = {d["index"]: tuple(d["shape"]) for d in inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for d in self.inputs:
            arr = feeds[d["name"]]
            if tuple(arr.shape) != self.shapes[d["index"]]:
                _check_free_axes(d, arr.shape)
                self.it.resize_tensor_input(d["index"], list(arr.shape))
                self.shapes[d["index"]] = tuple(arr.shape)
                resized = True
        if resized:
            try:
                self.it.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(f"the model cannot take these shapes: {exc}") from exc
        for d in self.inputs:
            self.it.set_tensor(d["index"], np.ascontiguousarray(feeds[d["name"]]))
        self.it.invoke()
        return {d["name"]: self.it.get_tensor(d["index"]) for d in self.outputs}  # get_tensor copies


class TfliteRuntime(Runtime):
    name = "tflite"
    thread_safe = True  # each run borrows an interpreter of its own (or waits for one)

    def __init__(self, path: str, threads: int = 1, copies: int = 1):
        cls, self.package = interpreter_class()

        def interpreter():
            try:
                it = cls(model_path=path, num_threads=threads)
                it.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise BundleError(f"{self.package} cannot load {path}: {str(exc).splitlines()[0]}") from exc
            return it

        self.copies = max(1, copies)
        it = interpreter()
        self._first = _Copy(it, it.get_input_details(), it.get_output_details())
        self._free: queue.SimpleQueue[_Copy] = queue.SimpleQueue()
        self._free.put(self._first)
        for _ in range(self.copies - 1):  # the same model: the first one's I/O details hold for all
            self._free.put(_Copy(interpreter(), self._first.inputs, self._first.outputs))

    @property
    def input_details(self) -> list[dict]:
        """The interpreter's own description of the inputs (shape signature, dtype, quantization)."""
        return self._first.inputs

    @property
    def output_details(self) -> list[dict]:
        return self._first.outputs

    def tensor_details(self) -> list[dict]:
        """Every tensor of the model, with its quantization (for tools that inspect a model)."""
        return self._first.it.get_tensor_details()

    def input_names(self) -> list[str]:
        return [d["name"] for d in self._first.inputs]

    def output_names(self) -> list[str]:
        return [d["name"] for d in self._first.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        copy = self._free.get()
        try:
            return copy.run(feeds)
        finally:
            self._free.put(copy)

    def close(self) -> None:
        self._first = None
        self._free = queue.SimpleQueue()


def load(path: str, threads: int = 1, providers: list[str] | None = None, copies: int = 1) -> Runtime:  # noqa: ARG001
    return TfliteRuntime(path, threads, copies)
