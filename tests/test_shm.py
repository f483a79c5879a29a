"""Large local requests in shared memory (agent/shm.py): the client attaches a sealed memfd to
its connection to a model's worker once, then sends only headers. Unit tests on a direct
server with a numpy stand-in for the runtime; the same path on a real worker is in
tests/test_serving.py."""

import contextlib
import fcntl
import os
import socket
import struct

import numpy as np
import pytest

from agent import protocol, shm, wire
from agent.batcher import Batcher
from agent.bundle import TensorSpec
from agent.client import LocalClient
from agent.direct import DirectServer
from agent.localapi import recv_message
from agent.polling import wait_until
from agent.tensors import from_frame, from_numpy, to_numpy

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs Linux memfds (every board and CI machine has them)")

ROW = 4096  # floats a row: 16 kB; 14 rows are over the socket's usual 208 kB send buffer


@contextlib.contextmanager
def _server(tmp_path, mode: str, grow: int = 1, **kw):
    """A direct server for model "m" (x: float32 [N, ROW]) that doubles its input, repeated
    `grow` times along the row (an answer larger than its request, as a segmentation mask is)."""
    double = lambda feeds: [from_numpy("y", np.tile(to_numpy(feeds[0]) * 2, (1, grow)))]  # noqa: E731
    spec = [TensorSpec("x", "float32", [-1, ROW])]
    batcher = None
    if mode == "streaming":
        srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, spec, double, **kw)
    else:
        batcher = Batcher("m", double, max_batch=64, max_delay_ms=1)
        srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, spec, batcher.submit,
                           submit=batcher.submit_async, reader=mode == "one-reader", **kw)
    try:
        yield srv
    finally:
        srv.close()
        if batcher:
            batcher.close()


def _client(srv) -> LocalClient:
    client = LocalClient(str(srv.path), spin_us=0)
    client._routes["m"] = str(srv.path)  # as the agent's route op would answer for this model
    return client


def _region(client, srv, use="requests"):
    return client._regions().get((str(srv.path), use))


@pytest.mark.parametrize("mode", ["streaming", "thread-per-connection"])
def test_large_requests_and_answers_travel_in_shared_memory_with_the_same_results(tmp_path, mode):
    x = np.random.default_rng(0).random((20, ROW), dtype=np.float32)  # 320 kB: over the socket's send buffer
    with _server(tmp_path, mode) as srv, _client(srv) as client:
        first = client.infer("m", {"x": x})["y"]  # the request in a region; its answer inline, as none is attached
        np.testing.assert_array_equal(first, 2 * x)
        region, answers = _region(client, srv), _region(client, srv, "answers")
        assert isinstance(region, shm.Region) and region.size == 320 * 1024
        assert isinstance(answers, shm.Region) and answers.size == 320 * 1024  # attached after that answer
        # the worker counts both regions as held (a request's own bytes it gives back just after answering)
        wait_until(lambda: srv.held.held == 640 * 1024, 2, "the regions held", 0.01)
        results = {k: client.infer("m", {"x": x[:k] + k})["y"] for k in (14, 20, 17)}  # answers in the region
        for k, y in results.items():  # each copied out: the next answer did not overwrite it
            np.testing.assert_array_equal(y, 2 * (x[:k] + k))
        np.testing.assert_array_equal(first, 2 * x)
        assert _region(client, srv) is region and _region(client, srv, "answers") is answers
        small = client.infer("m", {"x": x[:4]})["y"]  # 64 kB: fits the send buffer, so the request goes inline
        np.testing.assert_array_equal(small, 2 * x[:4])
        big = np.tile(x, (3, 1))  # 960 kB: a larger request region replaces the first; the answer comes inline
        np.testing.assert_array_equal(client.infer("m", {"x": big})["y"], 2 * big)
        np.testing.assert_array_equal(client.infer("m", {"x": big - 1})["y"], 2 * (big - 1))  # now in a region
        grown, grown_answers = _region(client, srv), _region(client, srv, "answers")
        assert grown is not region and grown.size == 960 * 1024 and grown_answers.size == 960 * 1024
        wait_until(lambda: srv.held.held == 2 * 960 * 1024, 2, "only the new regions held", 0.01)
    wait_until(lambda: srv.held.held == 0, 2, "the regions given back when the connection closed", 0.01)


def test_a_small_request_with_a_large_answer_gets_it_in_shared_memory(tmp_path):
    x = np.arange(2 * ROW, dtype=np.float32).reshape(2, ROW)  # 32 kB in, 512 kB out
    with _server(tmp_path, "streaming", grow=16) as srv, _client(srv) as client:
        for i in range(3):
            y = client.infer("m", {"x": x + i})["y"]
            np.testing.assert_array_equal(y, np.tile(2 * (x + i), (1, 16)))
        answers = _region(client, srv, "answers")
        assert _region(client, srv) is None and answers.size == 512 * 1024
        # the last answer was written there by the worker (the first, before the region, came inline)
        np.testing.assert_array_equal(np.frombuffer(answers.map, np.float32, count=y.size).reshape(y.shape), y)


def test_requests_that_fit_the_socket_buffer_go_inline(tmp_path):
    """Below the send buffer's size shared memory is no faster (scripts/bench_local_api.py): no region."""
    with _server(tmp_path, "streaming") as srv, _client(srv) as client:
        conn = client._conn(str(srv.path))
        fits = conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // (ROW * 4)
        x = np.ones((fits, ROW), np.float32)
        np.testing.assert_array_equal(client.infer("m", {"x": x})["y"], 2)
        assert _region(client, srv) is None
        np.testing.assert_array_equal(client.infer("m", {"x": np.ones((fits + 1, ROW), np.float32)})["y"], 2)
        assert isinstance(_region(client, srv), shm.Region)


def test_a_server_that_does_not_take_descriptors_gets_the_bytes_inline(tmp_path):
    """A batched model with small rows is read by one thread that takes no descriptors: the
    client's attach is refused, and that connection sends inline from then on."""
    x = np.ones((20, ROW), np.float32)
    with _server(tmp_path, "one-reader") as srv, _client(srv) as client:
        np.testing.assert_array_equal(client.infer("m", {"x": x})["y"], 2)
        assert _region(client, srv) is False
        np.testing.assert_array_equal(client.infer("m", {"x": 3 * x})["y"], 6)
        wait_until(lambda: srv.held.held == 0, 2, "nothing held", 0.01)


def _connect(path) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(path))
    raw.settimeout(5)
    return raw


def _send_attach(raw, fd, **extra):
    frame = wire.pack({"v": protocol.VERSION, "op": "attach", **extra})
    socket.send_fds(raw, [struct.pack(">I", len(frame)) + frame], [fd])


def _reply(raw):
    header, body = wire.unpack(recv_message(raw))
    return header, body


def _shm_request(specs):
    frame = wire.pack({"v": protocol.VERSION, "op": "infer", "model": "m", "tensors": specs, "shm": True})
    return struct.pack(">I", len(frame)) + frame


def _inline_request(x):
    frame = wire.pack_tensors({"x": x}, v=protocol.VERSION, op="infer", model="m")
    return struct.pack(">I", len(frame)) + frame


def _open_fds() -> list:
    return sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))


def test_descriptors_that_are_not_sealed_memfds_are_refused_closed_and_harm_nobody(tmp_path):
    x = np.ones((2, ROW), np.float32)
    with _server(tmp_path, "streaming", max_message=1 << 20) as srv:
        raw = _connect(srv.path)
        raw.sendall(_inline_request(x))  # answered: the worker has accepted the connection
        assert _reply(raw)[0]["status"] == "ok"
        before = _open_fds()
        unsealed = os.memfd_create("t", os.MFD_ALLOW_SEALING)  # could shrink under the worker: SIGBUS
        os.ftruncate(unsealed, 1 << 16)
        plain = open(tmp_path / "f", "wb+")
        plain.truncate(1 << 16)
        huge = shm.Region(2 << 20)  # sealed, but over api.max_request_mb
        cases = [(unsealed, "not sealed against shrinking"), (plain.fileno(), "not sealed against shrinking"),
                 (huge.fd, "a region of 2097152 bytes (this worker takes 1 to 1048576)")]
        for fd, why in cases:
            _send_attach(raw, fd)
            header, _ = _reply(raw)
            assert header["status"] == "error" and why in header["error"], header
        read_only = os.memfd_create("t", os.MFD_ALLOW_SEALING)  # the worker could not write answers there
        os.ftruncate(read_only, 1 << 16)
        fcntl.fcntl(read_only, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
        for use, why in (("answers", "cannot be mapped"), ("everything", "use 'everything' is not one of")):
            _send_attach(raw, read_only, use=use)
            header, _ = _reply(raw)
            assert header["status"] == "error" and why in header["error"], header
        os.close(read_only)
        # a descriptor on anything but attach is refused too, and closed
        frame = wire.pack_tensors({"x": x}, v=protocol.VERSION, op="infer", model="m")
        socket.send_fds(raw, [struct.pack(">I", len(frame)) + frame], [unsealed])
        header, _ = _reply(raw)
        assert header["status"] == "error" and "only attach may" in header["error"]
        os.close(unsealed)
        plain.close()
        huge.close()
        wait_until(lambda: srv.held.held == 0, 2, "nothing held", 0.01)
        # the same connection goes on inline, and the worker kept none of the descriptors
        raw.sendall(_inline_request(x))
        header, body = _reply(raw)
        assert header["status"] == "ok"
        np.testing.assert_array_equal(to_numpy(from_frame(header, body)[0]), 2)
        assert _open_fds() == before
        raw.close()


def test_shared_memory_requests_are_checked_against_the_region(tmp_path):
    with _server(tmp_path, "streaming") as srv:
        raw = _connect(srv.path)
        spec = {"name": "x", "dtype": "float32", "shape": [2, ROW], "offset": 0, "nbytes": 2 * ROW * 4}
        raw.sendall(_shm_request([spec]))  # nothing attached yet
        header, _ = _reply(raw)
        assert header["status"] == "error" and "none attached" in header["error"]
        frame = wire.pack({"v": protocol.VERSION, "op": "attach", "use": "requests"})
        raw.sendall(struct.pack(">I", len(frame)) + frame)  # the descriptor left out
        header, _ = _reply(raw)
        assert header["status"] == "error" and "attach brought no file descriptor" in header["error"]
        assert "SCM_RIGHTS" in header["error"]
        region = shm.Region(1 << 16)
        _send_attach(raw, region.fd)
        region.release_fd()
        header, _ = _reply(raw)
        assert header == {"v": protocol.VERSION, "status": "ok", "use": "requests", "nbytes": 1 << 16}
        # an answer asked for in shared memory with no answer region attached comes inline
        frame = wire.pack_tensors({"x": np.ones((1, ROW), np.float32)}, v=protocol.VERSION, op="infer", model="m",
                                  answer_shm=True)
        raw.sendall(struct.pack(">I", len(frame)) + frame)
        header, body = _reply(raw)
        assert header["status"] == "ok" and "shm" not in header
        np.testing.assert_array_equal(to_numpy(from_frame(header, body)[0]), 2)
        # past the region's end: a clear error, not a read of someone else's memory
        raw.sendall(_shm_request([{**spec, "shape": [8, ROW], "nbytes": 8 * ROW * 4}]))
        header, _ = _reply(raw)
        assert header["status"] == "error" and header["code"] == "bad_message", header
        # the worker reads what the client wrote there, each time afresh
        view = np.frombuffer(region.map, np.float32, count=2 * ROW)
        for value in (1, 4):
            view[:] = value
            view[5] = -value
            raw.sendall(_shm_request([spec]))
            header, body = _reply(raw)
            out = to_numpy(from_frame(header, body)[0])
            assert out.shape == (2, ROW) and out[0, 5] == -2 * value and out[1, 0] == 2 * value
        del view
        raw.close()
        region.close()
        wait_until(lambda: srv.held.held == 0, 2, "the region given back", 0.01)


def test_a_client_region_is_sealed_against_shrinking_and_growing():
    region = shm.Region(100)
    try:
        assert region.size == 64 * 1024
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(OSError):
            os.ftruncate(region.fd, 4096)
        with pytest.raises(ValueError, match="do not fit"):
            region.write({"x": np.zeros(20000, np.float64)})
    finally:
        region.close()
