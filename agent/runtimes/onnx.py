"""ONNX models through onnxruntime: thread count and execution providers from the agent's config."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort

from ..errors import BundleError
from .base import Runtime


# what onnxruntime says when a file is newer than it: its IR version, or an operator set's version
_TOO_NEW = (re.compile(r"Unsupported model IR version: \d+, max supported IR version: \d+"),
            re.compile(r"Current official support for domain \S+ is till opset \d+"))


def _load_error(path: str, message: str) -> BundleError:
    """A one-line error for a file onnxruntime cannot load, naming the fix when it is only too old."""
    for pattern in _TOO_NEW:
        found = pattern.search(message)
        if found:
            return BundleError(f"this board's onnxruntime {ort.__version__} is older than {path} needs "
                               f"({found.group(0)})",
                               "upgrade onnxruntime on the board, or export the model at an opset this "
                               "onnxruntime knows and convert it again")
    return BundleError(f"onnxruntime cannot load {path}: {message.splitlines()[0] if message else 'no reason given'}")


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
            raise _load_error(path, str(exc)) from exc
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
