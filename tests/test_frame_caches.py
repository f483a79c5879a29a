"""What the local API keeps per distinct frame header (agent/wire.py, agent/direct.py): the same
answers as parsing every frame afresh, and no way for a later frame to reuse an earlier one's checks
for bytes they do not cover."""

from __future__ import annotations

import numpy as np
import pytest

from agent import wire
from agent.direct import DirectServer
from agent.errors import ProtocolError
from agent.tensors import InputSpec, from_frame, from_numpy


def _frame(arrays: dict, **header) -> bytes:
    return b"".join(bytes(p) for p in wire.frame_parts(arrays, **header))


def test_a_repeated_header_is_parsed_once_and_each_body_is_its_own():
    frames = wire.TensorFrames()
    a, b = (np.full((2, 3), v, np.float32) for v in (1.0, 2.0))
    fa, fb = _frame({"x": a}, op="infer"), _frame({"x": b}, op="infer")
    ha, body_a, key_a = frames.unpack(fa)
    hb, body_b, key_b = frames.unpack(fb)
    assert key_a == key_b and ha is hb  # one parse for both
    for body, want in ((body_a, a), (body_b, b)):
        (t,) = frames.tensors(ha, body, key_a)
        assert (t.name, t.dtype, t.shape) == ("x", "float32", (2, 3))
        assert np.array_equal(np.frombuffer(t.data, np.float32).reshape(2, 3), want)
    # the same header on a body too short for it: the full checks run, and refuse it
    short = fa[:-4]
    h, body, key = frames.unpack(short)
    with pytest.raises(ProtocolError, match="the frame holds 24 at offset 0 of 20"):
        frames.tensors(h, body, key)
    with pytest.raises(ProtocolError, match="missing EWF1 magic"):
        frames.unpack(b"XXXX" + fa[4:])
    with pytest.raises(ProtocolError, match="does not fit"):
        frames.unpack(fa[:8] + b"{}")


def test_the_caches_stay_bounded_and_skip_large_headers():
    frames = wire.TensorFrames(entries=4, max_key=200)
    for n in range(1, 11):
        frame = _frame({"x": np.zeros((n, 1), np.float32)})
        h, body, key = frames.unpack(frame)
        assert len(frames.tensors(h, body, key)[0].data) == 4 * n
        assert len(frames._parsed) <= 4 and len(frames._layouts) <= 4
    big = _frame({"x": np.zeros((1, 1), np.float32)}, note="n" * 300)
    h, body, key = frames.unpack(big)
    frames.tensors(h, body, key)
    assert key not in frames._parsed and key not in frames._layouts


def test_request_heads_made_once_are_the_bytes_made_afresh():
    heads: dict = {}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for arrays in ({"x": x}, {"x": x + 1}, {"x": x[:2]}, {"x": x.astype("<f8")}, {"x": x.T},
                   {"x": x.astype(">f4")}, {"x": x, "y": np.ones(2, np.uint8)}):
        fresh = _frame(arrays, v=1, op="infer", model="m")
        for _ in range(2):
            assert b"".join(bytes(p) for p in wire.frame_parts(arrays, heads, v=1, op="infer", model="m")) == fresh
        header, body = wire.unpack(fresh)
        got = {t.name: np.frombuffer(t.data, t.dtype).reshape(t.shape) for t in from_frame(header, body)}
        assert all(np.array_equal(got[k], np.asarray(v)) for k, v in arrays.items())
    shapes = [shape for key in heads for _, _, shape in key[1]]
    assert (3, 4) in shapes and (4, 3) not in shapes  # x.T is not contiguous: sent as a copy, its head never kept


def test_the_model_socket_checks_every_request_whatever_it_kept(tmp_path):
    calls = []

    def run(feeds):
        calls.append([(t.name, t.shape, bytes(t.data)) for t in feeds])
        return [from_numpy("y", np.frombuffer(feeds[0].data, np.float32).reshape(feeds[0].shape) * 2)]

    srv = DirectServer(str(tmp_path / "m.sock"), 0o600, "m", 1, [InputSpec("input", "float32", [-1, 3])], run)
    try:
        def ask(frame):
            header, body = wire.unpack(srv.handle(memoryview(frame)))
            return header, {t.name: np.frombuffer(t.data, t.dtype).reshape(t.shape) for t in from_frame(header, body)}

        for v in (1.0, 5.0, 7.0):  # one header, three bodies: each answer is its own
            header, out = ask(_frame({"pixels": np.full((2, 3), v, np.float32)}, v=1, op="infer", model="m"))
            assert header["status"] == "ok" and np.array_equal(out["y"], np.full((2, 3), 2 * v, np.float32))
        assert [c[0][:2] for c in calls] == [("input", (2, 3))] * 3  # renamed to the model's input each time
        good = _frame({"pixels": np.ones((2, 3), np.float32)}, v=1, op="infer", model="m")
        for bad, words in ((good[:-8], "the frame holds 24 at offset 0 of 16"),
                           (_frame({"pixels": np.ones((2, 4), np.float32)}, v=1, op="infer", model="m"), "shape"),
                           (_frame({"pixels": np.ones((2, 3), np.float64)}, v=1, op="infer", model="m"), "dtype")):
            header, _ = ask(bad)
            assert header["status"] == "error" and words in header["error"], header
        assert len(calls) == 3  # none of the bad ones reached the model
    finally:
        srv.close()
