"""ONNX models through onnxruntime: thread count and execution providers from the agent's config."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import BundleError
from .base import Runtime


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called from several threads at once

    def __init__(self, path: str, threads: int = 1, providers: list[str] | None = None):
        # execution providers the config asks for (e.g. TensorrtExecutionProvider, CUDAExecutionProvider on
        # a Jetson), those this onnxruntime build has, in that order; the CPU always comes last as the fallback
        have = set(ort.get_available_providers())
        chosen = [p for p in (providers or []) if p in have and p != "CPUExecutionProvider"]
        self.providers = chosen + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(path, sess_options=opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        # what the session really runs on: a provider whose libraries fail to load (CUDA, TensorRT)
        # is dropped by onnxruntime with only a log line, so the agent reports this list instead
        self.providers = list(self._session.get_providers())
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]

    def input_names(self) -> list[str]:
        return list(self._inputs)

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, results))

    def close(self) -> None:
        self._session = None


def load(path: str, threads: int = 1, providers: list[str] | None = None, copies: int = 1) -> Runtime:  # noqa: ARG001
    """`copies` is for runtimes that run one call at a time; a session runs many at once."""
    return OnnxRuntime(path, threads, providers)
