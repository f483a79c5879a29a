"""Request counters and recent latencies for one model, from wherever its requests are served.

The agent keeps one per model for the requests it routes; a model worker keeps one for the
local apps that reach it directly (agent/direct.py) and exports it, and the agent adds that
export into the model's telemetry.
"""

from __future__ import annotations

import threading
from collections import deque

from .protocol import ModelStats

LATENCY_WINDOW = 2048


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Stats:
    """Request counters and a window of recent latencies, safe to update from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._rows = 0
        self._runs = 0

    def record(self, latency_ms: float | None, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies.append(latency_ms)
            else:
                self.errors += 1

    def record_run(self, rows: int) -> None:
        """One execution of the model (a batch of `rows`, which may serve several requests)."""
        with self._lock:
            self._rows += rows
            self._runs += 1

    def snapshot(self, version: int, inflight: int = 0, extra: dict | None = None,
                 streams: int | None = None) -> ModelStats:
        """Counters and percentiles; `extra` adds what a worker counted itself (direct requests)."""
        with self._lock:
            extra = extra or {}
            latencies = list(self._latencies) + list(extra.get("latencies", []))
            requests = self.requests + int(extra.get("requests", 0))
            errors = self.errors + int(extra.get("errors", 0))
            rows, runs = self._rows + int(extra.get("rows", 0)), self._runs + int(extra.get("runs", 0))
            p50 = p95 = p99 = None
            if latencies:
                ordered = sorted(latencies)
                p50, p95, p99 = (round(_percentile(ordered, q), 3) for q in (50, 95, 99))
            return ModelStats(version=version, requests=requests, errors=errors, p50_ms=p50, p95_ms=p95,
                              p99_ms=p99, mean_batch=round(rows / runs, 2) if runs else None,
                              inflight=inflight, streams=streams)

    def export(self) -> dict:
        """Everything counted, as plain data (what a worker sends the agent for `snapshot(extra=...)`)."""
        with self._lock:
            return {"requests": self.requests, "errors": self.errors, "latencies": list(self._latencies),
                    "rows": self._rows, "runs": self._runs}
