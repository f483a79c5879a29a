"""The RAM budget: what the agent process really uses, measured with psutil, and who may load.

The budget caps the memory of the agent and its model workers together, counted as PSS
(proportional set size: each page once, split among the processes that map it). An RSS
sum would count the pages every worker shares (libpython, numpy, the runtime's library)
once per worker: measured with scripts/bench_budget.py, each ONNX model's worker added
61-63 MB to the RSS sum but 31-41 MB of PSS (TFLite: 43-47 and 22-27), so a budget on the
RSS sum refused models that fit: three ONNX models were 216 MB of RSS and 128 MB of PSS. Where
psutil cannot read a process's PSS (no /proc/<pid>/smaps), that process counts its RSS.
Reading PSS costs the kernel a walk of the process's mappings (about 0.5 ms a process on
the benchmark machine), so it is read at admissions and telemetry ticks, never per request.
A load is admitted only if that total plus the model's cost (a worker's base, the
runtime's import cost and the bundle's host-measured load cost, all measured as RSS, so
on the safe side) stays inside the budget, and the system keeps `reserve_mb` available.
A refusal says by how much it misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from .errors import BudgetError

MB = 1024 * 1024


@dataclass
class Admission:
    cost_mb: float
    used_mb: float
    budget_mb: float
    available_mb: float


class Budget:
    def __init__(self, budget_mb: float, reserve_mb: float = 64):
        self.budget_mb = float(budget_mb)
        self.reserve_mb = float(reserve_mb)
        self._proc = psutil.Process()

    def rss_mb(self) -> float:
        """The agent's RSS plus that of every model worker it started."""
        total = 0
        for proc in self._processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # it exited between listing and reading
                pass
        return total / MB

    def _processes(self) -> list[psutil.Process]:
        """The agent and every model worker it started (tracked by pid: psutil's children()
        refuses to work under qemu-user, where /proc/self looks different)."""
        from .modelproc import live_pids

        return [self._proc, *filter(None, (_process(pid) for pid in live_pids()))]

    def used_mb(self) -> float:
        """What the budget counts: the PSS of the agent and every model worker it started."""
        return self.measure()[1]

    def measure(self) -> tuple[float, float]:
        """(RSS sum, PSS) in MB of the agent and every model worker it started, each process read once."""
        rss = pss = 0
        for proc in self._processes():
            try:
                m = proc.memory_full_info()
                rss, pss = rss + m.rss, pss + m.pss
            except Exception:  # PSS unreadable here (no smaps, qemu-user): its RSS; never a failed admission
                try:
                    own = proc.memory_info().rss
                except psutil.Error:  # it exited between listing and reading
                    continue
                rss, pss = rss + own, pss + own
        return rss / MB, pss / MB

    @staticmethod
    def available_mb() -> float:
        return psutil.virtual_memory().available / MB

    def admit(self, name: str, cost_mb: float) -> Admission:
        """Raise BudgetError unless a load costing `cost_mb` fits both the budget and the system."""
        used, avail = self.used_mb(), self.available_mb()
        room = self.budget_mb - used
        if cost_mb > room:
            raise BudgetError(
                f"model {name!r} needs {cost_mb:.1f} MB, the budget leaves {max(room, 0):.1f} MB "
                f"(agent and workers use {used:.1f} MB of {self.budget_mb:.0f} MB): short by {cost_mb - room:.1f} MB",
                "raise memory.budget_mb (--budget-mb) or unload another model",
            )
        system_room = avail - self.reserve_mb
        if cost_mb > system_room:
            raise BudgetError(
                f"model {name!r} needs {cost_mb:.1f} MB but the system has {avail:.1f} MB available "
                f"and keeps {self.reserve_mb:.0f} MB in reserve: short by {cost_mb - system_room:.1f} MB",
                "free memory on the board or lower memory.reserve_mb",
            )
        return Admission(cost_mb, used, self.budget_mb, avail)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None
