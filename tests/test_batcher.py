"""agent/batcher.py on its own: when batches may overlap, and how long a request may wait.
A numpy stand-in for the runtime; the real model and worker are in tests/test_serving.py."""

import threading
import time

import numpy as np

from agent import batcher as batcher_module
from agent.batcher import Batcher
from agent.tensors import from_numpy, to_numpy


class Recorder:
    """A model that takes `run_s` per batch (sleeping, as a runtime releases the GIL) and
    records how many batches ran at once and their sizes."""

    def __init__(self, run_s: float, stall_s: float = 0.0, stall_at: int = -1):
        self.run_s = run_s
        self.stall_s, self.stall_at = stall_s, stall_at  # batch number `stall_at` takes stall_s instead
        self.calls = 0
        self.running = self.most = 0
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, feeds):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            stalled = self.calls == self.stall_at
            self.calls += 1
        time.sleep(self.stall_s if stalled else self.run_s)
        x = to_numpy(feeds[0])
        with self._lock:
            self.running -= 1
            self.sizes.append(len(x))
        return [from_numpy("y", x + 1)]


def _callers(batcher: Batcher, n: int, calls: int) -> list:
    answers, errors = [], []

    def call(i: int) -> None:
        for j in range(calls):
            x = np.full((1, 2), i * 1000 + j, np.float32)
            try:
                answers.append((x, to_numpy(batcher.submit([from_numpy("x", x)])[0])))
            except Exception as exc:
                errors.append(exc)

    ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    return answers


def test_long_batches_overlap_up_to_in_flight_and_every_caller_gets_its_own_rows():
    model = Recorder(run_s=0.03)
    batcher = Batcher("m", model, max_batch=4, max_delay_ms=1, in_flight=2)
    try:
        answers = _callers(batcher, n=8, calls=5)
    finally:
        batcher.close()
    assert len(answers) == 40
    assert all((got == x + 1).all() for x, got in answers)
    assert model.most == 2  # two batches ran at once, never more
    assert max(model.sizes) <= 4


def test_one_batch_at_a_time_when_in_flight_is_one():
    model = Recorder(run_s=0.03)
    batcher = Batcher("m", model, max_batch=4, max_delay_ms=1, in_flight=1)
    try:
        _callers(batcher, n=8, calls=3)
    finally:
        batcher.close()
    assert model.most == 1


def test_short_batches_run_alone_even_with_threads_to_spare(monkeypatch):
    """Under PARALLEL_MIN_S a second batch would only split the work into two half batches.
    The threshold is raised here so that a busy host's scheduler (a 0.1 ms sleep that takes
    2 ms) cannot make these batches look long."""
    monkeypatch.setattr(batcher_module, "PARALLEL_MIN_S", 0.02)
    model = Recorder(run_s=0.0001)
    batcher = Batcher("m", model, max_batch=4, max_delay_ms=1, in_flight=4)
    try:
        answers = _callers(batcher, n=8, calls=20)
    finally:
        batcher.close()
    assert len(answers) == 160
    assert model.most == 1


def test_one_stalled_batch_does_not_let_short_batches_overlap(monkeypatch):
    """A batch held up by the scheduler (or a GC pause) is not the model's speed."""
    monkeypatch.setattr(batcher_module, "PARALLEL_MIN_S", 0.02)
    model = Recorder(run_s=0.0001, stall_s=0.2, stall_at=3)
    batcher = Batcher("m", model, max_batch=4, max_delay_ms=1, in_flight=4)
    try:
        _callers(batcher, n=8, calls=10)
    finally:
        batcher.close()
    assert model.calls > 4
    assert model.most == 1


def test_a_request_waits_at_most_max_delay_after_it_was_queued_even_while_a_batch_runs():
    """The deadline counts from the oldest request's arrival, not from when a thread got free."""
    model = Recorder(run_s=0.2)
    batcher = Batcher("m", model, max_batch=64, max_delay_ms=150, in_flight=1)
    try:
        first = threading.Thread(target=batcher.submit, args=([from_numpy("x", np.zeros((1, 2), np.float32))],))
        first.start()
        time.sleep(0.17)  # the first (one row) waited its 150 ms and is running now, until ~0.35 s
        t0 = time.monotonic()
        batcher.submit([from_numpy("x", np.ones((1, 2), np.float32))])
        waited = time.monotonic() - t0
        first.join()
    finally:
        batcher.close()
    # queued at ~0.17 s, due at ~0.32 s; the thread is free at ~0.35 s and runs it at once:
    # ~0.38 s of waiting. Counting 150 ms from when the thread got free would make it ~0.53 s.
    assert model.sizes == [1, 1]
    assert waited < 0.45, waited

