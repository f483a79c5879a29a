"""Dynamic micro-batching for one model: many callers' requests, one run of the model.

A request waits at most `max_delay_ms` after the oldest queued one for others to join;
a batch closes early when it reaches `max_batch` rows. Requests are never split: a
batch takes whole requests in arrival order. The joined batch is padded with zero
rows up to the model's fixed batch size, or up to the next `preferred_batch` size
(for runtimes that prefer a few known shapes), and the outputs are cut back into one
answer per caller. The queue is bounded in rows: past `max_queue` a caller gets "busy"
at once instead of the agent growing. A caller that goes away (its connection closes, or
is dropped for not reading its answers) takes its queued requests with it (`cancel`):
nobody waits for their answers, and their rows would keep the others out of the queue.

Up to `in_flight` batches run at once, each on a thread of its own, and one thread at a
time gathers the next batch while the others run. With one intra-op thread per run, a
2-core board then keeps both cores on the model (a CNN costs about as much per row at
batch 32 as at batch 1, so a single batch thread would leave a core idle). A model whose
batches run in under `PARALLEL_MIN_S` gains nothing from that: the work per request in
Python outweighs the run, and two half batches cost more than one full one. So a batch
starts beside another only while the model's recent batches ran at least that long
(the median of the last few, so one batch stalled by the scheduler does not flip it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .errors import BusyError, CallerGone, EdgewardError, InferenceError
from .tensors import Tensor, concat, pad_rows, split

log = logging.getLogger(__name__)

PARALLEL_MIN_S = 0.001  # a batch shorter than this runs alone: see the module's docstring
RECENT_RUNS = 5  # how many batches' run times the overlap decision looks at


@dataclass
class _Pending:
    feeds: list[Tensor]
    rows: int
    queued_at: float
    on_done: Callable[[list[Tensor] | None, BaseException | None], None]
    owner: object = None  # the connection it came on: its requests go when it goes


class Batcher:
    def __init__(self, name: str, run: Callable[[list[Tensor]], list[Tensor]], max_batch: int, max_delay_ms: float,
                 preferred: list[int] | None = None, fixed_batch: int | None = None, max_queue: int = 1024,
                 in_flight: int = 1):
        self.name = name
        self._run = run
        self.max_batch = min(max_batch, fixed_batch) if fixed_batch else max_batch
        self.max_delay = max_delay_ms / 1000
        self.preferred = sorted(p for p in (preferred or []) if p <= self.max_batch)
        self.fixed_batch = fixed_batch
        self.max_queue = max_queue
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._closed = False
        self._gathering = threading.Lock()  # one thread gathers a batch while the others run theirs
        self._running = 0  # batches running now
        self._recent: deque[float] = deque(maxlen=RECENT_RUNS)  # run times of the last batches
        self._run_s = 0.0  # their median: decides whether two batches may overlap
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{name}-{i}", daemon=True)
                         for i in range(max(1, in_flight))]
        for t in self._threads:
            t.start()

    def submit(self, feeds: list[Tensor]) -> list[Tensor]:
        """Queue one request and wait for its share of a batch's outputs."""
        done = threading.Event()
        answer: list = [None, None]

        def finished(result, error):
            answer[:] = [result, error]
            done.set()

        self.submit_async(feeds, finished)
        done.wait()
        if answer[1] is not None:
            raise answer[1]
        return answer[0]

    def submit_async(self, feeds: list[Tensor],
                     on_done: Callable[[list[Tensor] | None, BaseException | None], None],
                     owner: object = None) -> None:
        """Queue one request; the batch thread calls on_done(outputs, None) or on_done(None, error)
        after the batch has run. A caller that can answer from there (agent/direct.py sends the
        reply itself) saves a thread wake-up per request. Refusals (busy, too many rows for a
        fixed batch, unloading) raise here, at once. A request larger than a batch runs now,
        in the caller's thread, and on_done is called before this returns. `owner` names the
        caller for `cancel`."""
        rows = feeds[0].rows if feeds else 1
        if rows > self.max_batch:
            if self.fixed_batch:
                raise InferenceError(f"model {self.name!r} runs batches of {self.fixed_batch}; "
                                     f"this request has {rows} rows", f"send at most {self.fixed_batch} rows")
            try:
                result = self._run(feeds)  # already a batch of its own
            except BaseException as exc:
                on_done(None, exc)
            else:
                on_done(result, None)
            return
        item = _Pending(feeds, rows, time.monotonic(), on_done, owner)
        with self._cv:
            if self._closed:
                raise InferenceError(f"model {self.name!r} is being unloaded; retry")
            if self._queued_rows + rows > self.max_queue:
                raise BusyError(f"model {self.name!r} has {self._queued_rows} rows queued (limit {self.max_queue})",
                                "retry later, or raise max_queue for this model")
            self._queue.append(item)
            self._queued_rows += rows
            self._cv.notify()

    def cancel(self, owner: object) -> int:
        """Take a departed caller's queued requests out of the queue; the rows taken out. Each
        is finished with an error, which its answer function (the connection's, now closed)
        discards while it gives back what the request held."""
        with self._cv:
            gone = [item for item in self._queue if item.owner is owner]
            if not gone:
                return 0
            self._queue = deque(item for item in self._queue if item.owner is not owner)
            rows = sum(item.rows for item in gone)
            self._queued_rows -= rows
        error = CallerGone(f"model {self.name!r}: the caller left before its request ran")
        for item in gone:
            self._finish(item, None, error)
        return rows

    def _wait_for_turn(self) -> None:
        """Hold back the next batch while one runs, unless batches run long enough to overlap."""
        with self._cv:
            while self._running and self._run_s < PARALLEL_MIN_S and not self._closed:
                self._cv.wait()

    def _take(self) -> list[_Pending] | None:
        """Block until a batch is due; return its requests (None once closed and drained)."""
        with self._cv:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cv.wait()
                deadline = self._queue[0].queued_at + self.max_delay  # the oldest waits at most max_delay
                while self._queued_rows < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, rows = [], 0
                while self._queue and rows + self._queue[0].rows <= self.max_batch:
                    item = self._queue.popleft()
                    batch.append(item)
                    rows += item.rows
                if batch:  # empty when the requests it waited for were cancelled meanwhile
                    self._queued_rows -= rows
                    self._running += 1
                    return batch

    def _loop(self) -> None:
        while True:
            with self._gathering:
                self._wait_for_turn()
                batch = self._take()
            if batch is None:
                return
            t0 = time.perf_counter()
            try:
                outputs = self._run_batch(batch)
            except BaseException as exc:  # every caller in the batch gets the error
                error = exc if isinstance(exc, EdgewardError) else InferenceError(f"batch failed: {exc!r}")
                outputs = None
            run_s = time.perf_counter() - t0
            if outputs is None:
                for item in batch:
                    self._finish(item, None, error)
            else:
                for item, result in zip(batch, outputs):
                    self._finish(item, result, None)
            with self._cv:  # answered: the callers are sending their next requests
                self._running -= 1
                self._recent.append(run_s)
                self._run_s = sorted(self._recent)[len(self._recent) // 2]
                self._cv.notify_all()

    def _finish(self, item: _Pending, result, error) -> None:
        try:
            item.on_done(result, error)
        except Exception:  # one caller's answer failing (its socket closed, ...) must not stop the batches
            log.exception("answering a batched request failed")

    def _run_batch(self, batch: list[_Pending]) -> list[list[Tensor]]:
        counts = [item.rows for item in batch]
        rows = sum(counts)
        target = self.fixed_batch or next((p for p in self.preferred if p >= rows), rows)
        joined = [pad_rows(concat([item.feeds[i] for item in batch]), target)
                  for i in range(len(batch[0].feeds))]
        out = self._run(joined)
        per_output = []
        for t in out:
            if t.rows != target:
                raise InferenceError(f"model {self.name!r}: output {t.name!r} has {t.rows} rows for a batch of "
                                     f"{target}; it cannot be batched", "serve it in streaming mode")
            per_output.append(split(t, counts))
        return [[parts[i] for parts in per_output] for i in range(len(batch))]

    def close(self) -> None:
        """Stop taking requests; those queued still run."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
