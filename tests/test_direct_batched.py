"""A batched model's direct socket (agent/direct.py with agent/batcher.py): the batch thread
sends each caller's answer itself. Unit test with a numpy stand-in for the runtime; the same
path on a real model and worker is in tests/test_serving.py."""

import contextlib
import socket
import struct
import threading
import time

import numpy as np
import pytest

from agent.batcher import Batcher
from agent.bundle import TensorSpec
from agent.client import LocalClient
from agent.direct import DirectServer
from agent.errors import BusyError, InferenceError
from agent.polling import wait_until
from agent.tensors import from_numpy, to_numpy


@pytest.fixture(params=[True, False], ids=["one-reader", "thread-per-connection"])
def server(tmp_path, request):
    runs = []

    def run(feeds):
        x = to_numpy(feeds[0])
        runs.append(len(x))
        if (x == 13).any():
            raise InferenceError("the runtime failed: unlucky number")
        return [from_numpy("y", x * 2)]

    batcher = Batcher("m", run, max_batch=8, max_delay_ms=30)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, spin_us=100, submit=batcher.submit_async, reader=request.param)
    assert srv._reader is request.param
    yield srv, runs
    srv.close()
    batcher.close()


def test_concurrent_callers_share_batches_and_each_gets_its_own_rows(server):
    srv, runs = server
    client = LocalClient(str(srv.path), direct=False)
    out, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def call(i):
        barrier.wait()
        try:
            out[i] = client.infer("m", {"x": np.full((1, 2), i, np.float32)})["y"]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert errors == []
    for i in range(8):
        np.testing.assert_array_equal(out[i], np.full((1, 2), 2 * i))
    assert max(runs) > 1                     # they really ran together
    assert srv.stats.export()["requests"] == 8
    client.close()


def test_a_failing_batch_answers_its_callers_with_the_error_and_the_next_batch_runs(server):
    srv, _ = server
    with LocalClient(str(srv.path), direct=False) as client:
        with pytest.raises(InferenceError, match="unlucky number"):
            client.infer("m", {"x": np.full((1, 2), 13, np.float32)})
        np.testing.assert_array_equal(client.infer("m", {"x": np.ones((1, 2), np.float32)})["y"], 2)
    assert srv.stats.export()["errors"] == 1


def test_a_caller_that_hangs_up_before_its_answer_harms_nobody(server):
    srv, runs = server
    from agent import protocol, wire

    frame = b"".join(bytes(p) for p in wire.frame_parts({"x": np.ones((1, 2), np.float32)}, v=protocol.VERSION,
                                                        op="infer", model="m"))
    for _ in range(3):  # each sends a request and leaves while it waits in the batcher
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(srv.path))
        raw.sendall(struct.pack(">I", len(frame)) + frame)
        raw.close()
    time.sleep(0.1)
    with LocalClient(str(srv.path), direct=False) as client:
        np.testing.assert_array_equal(client.infer("m", {"x": np.full((1, 2), 3, np.float32)})["y"], 6)
    assert sum(runs) >= 1  # the others' requests were dropped unrun, or ran unanswered: either harms nobody
    assert srv.stats.export()["errors"] == 0  # a request its caller gave up on is not a failed request


@pytest.mark.parametrize("reader", [True, False], ids=["one-reader", "thread-per-connection"])
def test_a_callers_queued_requests_leave_with_it_and_never_run(tmp_path, reader):
    """While a batch runs, a caller queues requests and hangs up: they leave the queue at once
    (the room they held is free for the others) and the model never runs them."""
    release, ran = threading.Event(), []

    def run(feeds):
        release.wait(10)
        x = to_numpy(feeds[0])
        ran.extend(x[:, 0].tolist())
        return [from_numpy("y", x * 2)]

    batcher = Batcher("m", run, max_batch=1, max_delay_ms=0, max_queue=8)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, submit=batcher.submit_async, reader=reader, cancel=batcher.cancel)
    try:
        first = _connect(srv.path)
        first.sendall(_frame(1))  # runs now, and holds the batch thread until released
        wait_until(lambda: batcher._running == 1, 5, "the first batch to start", interval=0.005)
        leaver = _connect(srv.path)
        leaver.sendall(_frame(20) * 8)  # fills the queue (8 rows)
        wait_until(lambda: batcher._queued_rows == 8, 5, "the leaver's rows to queue", interval=0.005)
        leaver.close()
        wait_until(lambda: batcher._queued_rows == 0, 5, "the leaver's rows to leave the queue", interval=0.005)
        stayer = _connect(srv.path)
        stayer.sendall(_frame(3))  # room again: queued, not refused as busy
        wait_until(lambda: batcher._queued_rows == 1, 5, "the stayer's row to queue", interval=0.005)
        release.set()
        assert _answer(first)[1].tolist() == [[2, 2]]
        header, y = _answer(stayer)
        assert header["status"] == "ok" and y.tolist() == [[6, 6]]
        first.close()
        stayer.close()
    finally:
        release.set()
        srv.close()
        batcher.close()
    assert sorted(ran) == [1.0, 3.0]  # the leaver's 8 rows never ran
    assert srv.stats.export()["errors"] == 0


def _frame(value: float) -> bytes:
    from agent import protocol, wire

    frame = b"".join(bytes(p) for p in wire.frame_parts({"x": np.full((1, 2), value, np.float32)},
                                                        v=protocol.VERSION, op="infer", model="m"))
    return struct.pack(">I", len(frame)) + frame


def _connect(path) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(path))
    raw.settimeout(5)
    return raw


def _answer(raw: socket.socket):
    from agent import wire
    from agent.localapi import recv_message
    from agent.tensors import from_frame

    header, body = wire.unpack(recv_message(raw))
    return header, (to_numpy(from_frame(header, body)[0]) if header["status"] == "ok" else None)


def test_one_reader_serves_a_caller_that_sends_a_request_in_pieces_without_holding_up_others(server):
    """All of a batched model's connections are read by one thread: a slow sender must not stall it."""
    srv, _ = server
    slow, fast = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    slow.connect(str(srv.path))
    fast.connect(str(srv.path))
    data = _frame(5) + _frame(6)  # two requests, sent a few bytes at a time
    slow.sendall(data[:3])
    fast.sendall(_frame(1))
    fast.settimeout(5)
    header, y = _answer(fast)  # answered while the slow one's first message is incomplete
    assert header["status"] == "ok" and (y == 2).all()
    for i in range(3, len(data), 7):
        slow.sendall(data[i:i + 7])
    slow.settimeout(5)
    assert (_answer(slow)[1] == 10).all() and (_answer(slow)[1] == 12).all()  # in order, each whole
    slow.close()
    fast.close()


def test_an_oversized_message_is_answered_and_its_connection_dropped(server):
    srv, _ = server
    from agent.localapi import MAX_MESSAGE

    raw = _connect(srv.path)
    raw.sendall(struct.pack(">I", MAX_MESSAGE + 1))
    header, _ = _answer(raw)
    assert header["status"] == "error" and "over the" in header["error"]
    assert raw.recv(1) == b""  # closed
    raw.close()
    with LocalClient(str(srv.path), direct=False) as client:  # the others go on
        np.testing.assert_array_equal(client.infer("m", {"x": np.ones((1, 2), np.float32)})["y"], 2)


def test_a_batched_model_with_small_rows_gets_one_reader_and_one_with_images_a_thread_per_connection(tmp_path):
    batcher = Batcher("m", lambda feeds: feeds, max_batch=8, max_delay_ms=1)
    made = []
    try:
        for shape in ([-1, 64], [-1, 3, 128, 128], [-1, 3, -1, -1]):
            made.append(DirectServer(str(tmp_path / f"{len(made)}.sock"), 0o600, "m", 1,
                                     [TensorSpec("x", "float32", shape)], batcher.submit,
                                     submit=batcher.submit_async))
        streaming = DirectServer(str(tmp_path / "s.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 64])],
                                 batcher.submit)
        assert [s._reader for s in made] == [True, False, False]  # 256 B, 196 kB, unknown
        assert streaming._reader is False
    finally:
        for s in made + [streaming]:
            s.close()
        batcher.close()


def test_connections_past_the_limit_get_busy_and_closing_stops_the_reader(tmp_path):
    batcher = Batcher("m", lambda feeds: feeds, max_batch=8, max_delay_ms=1)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, max_conns=2, submit=batcher.submit_async)
    socks = []
    try:
        for _ in range(2):
            s = _connect(srv.path)
            socks.append(s)
        s.sendall(_frame(1))
        assert _answer(s)[0]["status"] == "ok"  # both are accepted by now
        extra = _connect(srv.path)
        header, _ = _answer(extra)
        assert header["status"] == "error" and header["code"] == "busy"
        extra.close()
    finally:
        srv.close()
        batcher.close()
    deadline = time.monotonic() + 5
    while any(t.name == "direct-reader" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "direct-reader" for t in threading.enumerate())
    for s in socks:
        assert s.recv(1) == b""  # the reader closed its connections on the way out
        s.close()


def test_a_large_request_sent_in_pieces_is_read_whole(server):
    """Over 64 kB a message is read straight into bytes of its own."""
    from agent import protocol, wire

    srv, _ = server
    x = np.arange(2 * 9000, dtype=np.float32).reshape(9000, 2) + 0.5  # 72 kB (and no 13): also more rows than a batch
    frame = b"".join(bytes(p) for p in wire.frame_parts({"x": x}, v=protocol.VERSION, op="infer", model="m"))
    data = struct.pack(">I", len(frame)) + frame + _frame(4)  # and a small one right behind it
    raw = _connect(srv.path)
    for i in range(0, len(data), 5000):
        raw.sendall(data[i:i + 5000])
        time.sleep(0.001)
    header, y = _answer(raw)
    assert header["status"] == "ok", header
    np.testing.assert_array_equal(y, x * 2)
    assert (_answer(raw)[1] == 8).all()
    raw.close()


def test_garbage_gets_an_error_answer_and_the_connection_goes_on(server):
    srv, _ = server
    raw = _connect(srv.path)
    raw.sendall(struct.pack(">I", 7) + b"garbage" + _frame(2))
    header, _ = _answer(raw)
    assert header["status"] == "error" and header["code"] == "bad_message"
    assert (_answer(raw)[1] == 4).all()
    raw.close()


def test_a_caller_that_sends_requests_without_reading_answers_holds_up_nobody_and_is_dropped(server, monkeypatch):
    """The batch thread answers every caller of its batch: it must never wait on one socket."""
    from agent import outbox

    srv, _ = server
    monkeypatch.setattr(outbox, "MAX_BACKLOG_BYTES", 16 * 1024)
    greedy = _connect(srv.path)
    requests = _frame(1) * 20000  # ~2 MB of answers, far over a socket's buffer; it never reads them

    def send_all():
        try:
            greedy.sendall(requests)
        except OSError:
            pass  # dropped while still sending

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    sender.join(20)
    assert not sender.is_alive()  # the server kept reading its requests (or dropped it)
    # The others are answered as soon as the dropped caller's bounded backlog (max_queue rows, still
    # queued when it was dropped) has run: "busy" until then, which is the queue's backpressure. A
    # batch thread that waited on the greedy socket would never get there.
    with LocalClient(str(srv.path), direct=False, timeout=5) as client:
        deadline = time.monotonic() + 5
        for i in range(5):
            while True:
                try:
                    y = client.infer("m", {"x": np.full((1, 2), i, np.float32)})["y"]
                    break
                except BusyError:
                    assert time.monotonic() < deadline, "the queue never drained: a batch thread is stuck"
                    time.sleep(0.01)
            np.testing.assert_array_equal(y, 2 * i)
    got, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline:  # what was sent arrives in order, then the connection ends
        chunk = greedy.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
    assert chunk == b"", "the server did not drop a caller that does not read"
    assert 0 < got < 20000 * 150
    greedy.close()


def test_a_large_answer_reaches_a_reader_whole_and_one_not_read_times_out(tmp_path, monkeypatch):
    from agent import outbox

    monkeypatch.setattr(outbox, "DRAIN_TIMEOUT_S", 1.5)  # long enough for a busy CI host's reader to keep up
    big = np.arange(1 << 20, dtype=np.float32)  # a 4 MB answer: more than a socket takes at once
    batcher = Batcher("m", lambda feeds: [from_numpy("y", big[None, :].repeat(len(to_numpy(feeds[0])), 0))],
                      max_batch=8, max_delay_ms=1)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, submit=batcher.submit_async, reader=True)
    try:
        idle = _connect(srv.path)
        idle.sendall(_frame(1))  # asks, then does not read for longer than DRAIN_TIMEOUT_S
        time.sleep(0.2)
        with LocalClient(str(srv.path), direct=False, timeout=5) as client:
            for _ in range(3):  # a caller that reads gets all 4 MB, each time, while the idle one waits
                np.testing.assert_array_equal(client.infer("m", {"x": np.ones((1, 2), np.float32)})["y"][0], big)
        time.sleep(2.0)
        got = b""
        while chunk := idle.recv(1 << 20):
            got += chunk
        assert len(got) < big.nbytes  # dropped before its answer was whole
    finally:
        srv.close()
        batcher.close()


@contextlib.contextmanager
def _doubling(tmp_path, reader: bool, max_delay_ms: float = 1, **limits):
    """A batched direct server whose model doubles its input, with the given limits."""
    batcher = Batcher("m", lambda feeds: [from_numpy("y", to_numpy(feeds[0]) * 2)], max_batch=8,
                      max_delay_ms=max_delay_ms)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, submit=batcher.submit_async, reader=reader, **limits)
    try:
        yield srv
    finally:
        srv.close()
        batcher.close()


@pytest.mark.parametrize("reader", [True, False], ids=["one-reader", "thread-per-connection"])
def test_a_request_over_api_max_request_mb_is_refused_before_its_bytes_are_held(tmp_path, reader):
    with _doubling(tmp_path, reader, max_message=4096) as srv:
        raw = _connect(srv.path)
        raw.sendall(struct.pack(">I", 4097))  # announced; none of its bytes need to follow
        header, _ = _answer(raw)
        assert header["status"] == "error" and "over the 4096-byte limit" in header["error"]
        assert "api.max_request_mb" in header["error"]
        assert raw.recv(1) == b""  # dropped
        raw.close()
        with LocalClient(str(srv.path), direct=False) as client:  # requests under the limit go on
            np.testing.assert_array_equal(client.infer("m", {"x": np.ones((100, 2), np.float32)})["y"], 2)


@pytest.mark.parametrize("reader", [True, False], ids=["one-reader", "thread-per-connection"])
def test_requests_held_past_api_max_held_mb_get_busy_and_the_bytes_are_given_back(tmp_path, reader):
    """Many callers at once cannot make a worker hold more than the bound: the next gets busy at once."""
    size = len(_frame(1)) - 4
    with _doubling(tmp_path, reader, max_delay_ms=400, max_held=2 * size + size // 2) as srv:
        waiting = [_connect(srv.path) for _ in range(2)]
        for i, raw in enumerate(waiting):  # both wait 400 ms for their batch, holding their bytes
            raw.sendall(_frame(i))
        time.sleep(0.1)
        third = _connect(srv.path)
        t0 = time.monotonic()
        third.sendall(_frame(7))
        header, _ = _answer(third)
        assert header["status"] == "error" and header["code"] == "busy" and "api.max_held_mb" in header["error"]
        assert time.monotonic() - t0 < 0.3  # at once, not after the batch
        assert [(_answer(raw)[1] == 2 * i).all() for i, raw in enumerate(waiting)] == [True, True]
        wait_until(lambda: srv.held.held == 0, 2, "the held bytes given back", 0.01)
        waiting[0].sendall(_frame(5))  # room again
        assert (_answer(waiting[0])[1] == 10).all()
        for raw in waiting + [third]:
            raw.close()
