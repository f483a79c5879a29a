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



def test_a_departed_callers_queued_requests_leave_the_queue_and_make_room_for_the_others():
    """A caller that goes away must not keep the others out: its rows leave the queue at once,
    each is finished with CallerGone, and none of them runs."""
    from agent.errors import BusyError, CallerGone

    release = threading.Event()
    ran: list[float] = []

    def model(feeds):
        release.wait(10)  # the first batch holds the only batch thread while the rest queue
        x = to_numpy(feeds[0])
        ran.extend(x[:, 0].tolist())
        return [from_numpy("y", x + 1)]

    batcher = Batcher("m", model, max_batch=1, max_delay_ms=0, max_queue=4, in_flight=1)
    gone, done = object(), []
    try:
        first = threading.Thread(target=batcher.submit, args=([from_numpy("x", np.zeros((1, 2), np.float32))],))
        first.start()
        deadline = time.monotonic() + 5
        while batcher._running == 0:  # the first request is running, holding the thread
            assert time.monotonic() < deadline
            time.sleep(0.001)
        for i in range(4):  # the departing caller fills the queue
            batcher.submit_async([from_numpy("x", np.full((1, 2), 10 + i, np.float32))],
                                 lambda out, error: done.append(error), owner=gone)
        try:
            batcher.submit_async([from_numpy("x", np.ones((1, 2), np.float32))], lambda *_: None)
            raise AssertionError("a full queue took another request")
        except BusyError:
            pass
        assert batcher.cancel(gone) == 4
        assert len(done) == 4 and all(isinstance(e, CallerGone) for e in done)
        assert batcher.cancel(gone) == 0
        answers = []
        stayer = threading.Thread(target=lambda: answers.append(
            to_numpy(batcher.submit([from_numpy("x", np.full((1, 2), 7, np.float32))])[0])))
        stayer.start()  # taken at once: the room is back
        release.set()
        first.join(5)
        stayer.join(5)
        np.testing.assert_array_equal(answers[0], 8)
    finally:
        release.set()
        batcher.close()
    assert sorted(ran) == [0.0, 7.0]  # the departed caller's rows never ran


def test_a_request_cancelled_while_its_batch_is_gathered_never_runs_and_the_next_one_does():
    """The gathering thread waits out max_delay for the oldest request; cancelled meanwhile,
    that request is not run, and the thread goes back to waiting for the next one."""
    from agent.errors import CallerGone

    model = Recorder(run_s=0.0)
    batcher = Batcher("m", model, max_batch=8, max_delay_ms=200, in_flight=1)
    gone, errors = object(), []
    try:
        batcher.submit_async([from_numpy("x", np.zeros((1, 2), np.float32))],
                             lambda out, error: errors.append(error), owner=gone)
        time.sleep(0.05)  # the batch thread is waiting for more rows until 200 ms
        assert batcher.cancel(gone) == 1
        time.sleep(0.25)  # past the gone request's deadline
        out = batcher.submit([from_numpy("x", np.full((1, 2), 4, np.float32))])
    finally:
        batcher.close()
    assert isinstance(errors[0], CallerGone)
    np.testing.assert_array_equal(to_numpy(out[0]), 5)
    assert model.sizes == [1]  # only the request still wanted ran; no empty batch
