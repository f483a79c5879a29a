"""The local client's wait for an answer: it polls only when an answer is expected soon,
and sleeps in recv() otherwise (unit test against a socket server in this process)."""

import os
import socket
import threading
import time

import numpy as np
import pytest

from agent import client as client_mod
from agent import protocol, wire
from agent.client import LocalClient
from agent.localapi import recv_message, send_message
from agent.polling import linger


def _server(path, delay_s, busy: bool = False):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{path}.binding")  # the socket appears at `path` only once it listens: a test that waits
    srv.listen(4)                # for the file would otherwise connect between bind and listen
    os.rename(f"{path}.binding", str(path))

    def serve():
        conn, _ = srv.accept()
        while (msg := recv_message(conn)) is not None:
            header, body = wire.unpack(msg)
            if busy:  # computes for delay_s, as a model does: a sleep would add the timer's slack
                end = time.perf_counter() + delay_s[0]
                while time.perf_counter() < end:
                    pass
            else:
                time.sleep(delay_s[0])
            send_message(conn, wire.pack_tensors({"y": np.ones(2, np.float32)}, v=protocol.VERSION, status="ok"))

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.fixture
def polls(monkeypatch):
    calls = []

    def counting(sock, seconds, *a, **kw):
        calls.append(seconds)
        return linger(sock, seconds, *a, **kw)

    monkeypatch.setattr(client_mod, "linger", counting)
    return calls


def test_the_client_polls_for_fast_answers_and_sleeps_through_slow_ones(tmp_path, polls):
    delay = [0.0]
    srv = _server(tmp_path / "s.sock", delay)
    with LocalClient(str(tmp_path / "s.sock"), direct=False, spin_us=50_000) as c:
        for _ in range(3):
            np.testing.assert_array_equal(c.infer("m", np.zeros(2, np.float32))["y"], 1.0)
        assert len(polls) == 3 and all(s == pytest.approx(0.05) for s in polls)
        delay[0] = 0.2                        # the model got slow: one more poll finds that out ...
        c.infer("m", np.zeros(2, np.float32))
        c.infer("m", np.zeros(2, np.float32))
        c.infer("m", np.zeros(2, np.float32))
        assert len(polls) == 4                # ... and then the client sleeps in recv()
        delay[0] = 0.0                        # fast again: the next answer (slept for) re-enables polling
        c.infer("m", np.zeros(2, np.float32))
        c.infer("m", np.zeros(2, np.float32))
        assert len(polls) == 5
    srv.close()


def test_an_answer_expected_in_a_few_ms_is_slept_for_then_polled_for(tmp_path, monkeypatch):
    """Hybrid polling: no CPU spent through most of the wait, and awake when the answer comes."""
    caught = []

    def recording(sock, seconds, *a, **kw):
        got = linger(sock, seconds, *a, **kw)
        caught.append((seconds, got))
        return got

    monkeypatch.setattr(client_mod, "linger", recording)
    import multiprocessing as mp

    def serve_elsewhere():  # in its own process: a server thread here would wait for this one's GIL
        _server(tmp_path / "s.sock", [0.005], busy=True)  # a 5 ms model
        time.sleep(60)

    proc = mp.get_context("fork").Process(target=serve_elsewhere, daemon=True)
    proc.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "s.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with LocalClient(str(tmp_path / "s.sock"), direct=False, spin_us=2000) as c:
        c.infer("m", np.zeros(2, np.float32))  # the first: polls 2 ms, then sleeps; now it knows ~5 ms
        started = time.process_time()
        for _ in range(10):
            c.infer("m", np.zeros(2, np.float32))
        cpu = time.process_time() - started
    proc.kill()
    later = caught[1:]
    assert all(s == pytest.approx(0.002) for s, _ in later)  # it polls one window ...
    assert len(later) >= 5  # after its sleep (an answer that comes early wakes the sleep instead)
    # Whether the answer then comes inside the window depends on the host's scheduling; on a
    # quiet host most do. Past the window the call sleeps in recv(), as it did before.
    assert cpu < 10 * 0.0035  # about one window of polling per call, not the whole 5 ms


def test_spin_zero_never_polls(tmp_path, polls):
    srv = _server(tmp_path / "s.sock", [0.0])
    with LocalClient(str(tmp_path / "s.sock"), direct=False, spin_us=0) as c:
        for _ in range(3):
            c.infer("m", np.zeros(2, np.float32))
    assert polls == []
    srv.close()


def test_linger_returns_as_soon_as_data_arrives_and_gives_up_after_its_window():
    a, b = socket.socketpair()
    t0 = time.perf_counter()
    assert linger(a, 0.02) is False
    assert time.perf_counter() - t0 >= 0.02
    threading.Timer(0.005, lambda: b.send(b"x")).start()
    t0 = time.perf_counter()
    assert linger(a, 1.0) is True
    assert time.perf_counter() - t0 < 0.5
    a.close(), b.close()


def test_linger_works_on_a_pipe_as_between_the_agent_and_its_workers():
    import os

    r, w = os.pipe()
    try:
        assert linger(r, 0.01) is False
        threading.Timer(0.005, lambda: os.write(w, b"x")).start()
        assert linger(r, 1.0) is True and os.read(r, 1) == b"x"
    finally:
        os.close(r), os.close(w)

