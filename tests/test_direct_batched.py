"""A batched model's direct socket (agent/direct.py with agent/batcher.py): the batch thread
sends each caller's answer itself. Unit test with a numpy stand-in for the runtime; the same
path on a real model and worker is in tests/test_serving.py."""

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
from agent.errors import InferenceError
from agent.tensors import from_numpy, to_numpy


@pytest.fixture
def server(tmp_path):
    runs = []

    def run(feeds):
        x = to_numpy(feeds[0])
        runs.append(len(x))
        if (x == 13).any():
            raise InferenceError("the runtime failed: unlucky number")
        return [from_numpy("y", x * 2)]

    batcher = Batcher("m", run, max_batch=8, max_delay_ms=30)
    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [TensorSpec("x", "float32", [-1, 2])],
                       batcher.submit, spin_us=100, submit=batcher.submit_async)
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
    assert sum(runs) >= 4
