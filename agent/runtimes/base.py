"""The interface every runtime backend implements: describe I/O, run a batch, close."""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover  (runtimes live in model workers; the agent never imports numpy)
    import numpy as np


class Runtime(ABC):
    name: str
    thread_safe: bool = False  # may run() be called from two threads at once?

    @abstractmethod
    def input_names(self) -> list[str]: ...

    @abstractmethod
    def output_names(self) -> list[str]: ...

    @abstractmethod
    def run(self, feeds: "dict[str, np.ndarray]") -> "dict[str, np.ndarray]":
        """Run one batch. Feeds are already validated against the manifest's input specs."""

    @abstractmethod
    def close(self) -> None: ...
