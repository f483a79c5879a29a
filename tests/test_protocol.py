"""The protocol module both ends use: topics, JSON schemas, binary tensor frames."""

import json

import numpy as np
import pytest

from agent import protocol, wire
from agent.errors import ProtocolError


def test_topics_round_trip_through_the_parser():
    assert protocol.parse_topic(protocol.state_topic("pi-01")) == protocol.Topic("pi-01", "state", None)
    assert protocol.parse_topic(protocol.cmd_topic("pi-01", "deploy")) == protocol.Topic("pi-01", "cmd", "deploy")
    assert protocol.parse_topic(protocol.infer_topic("pi-01", "digits")).arg == "digits"
    sha = "ab" * 32
    assert protocol.parse_topic(protocol.upload_topic("pi-01", sha)) == protocol.Topic("pi-01", "upload", sha)
    for sub in protocol.device_subscriptions("pi-01"):
        assert sub.startswith("edgeward/v1/pi-01/") and sub.endswith("/+")


@pytest.mark.parametrize("topic", ["edgeward/v2/pi/state", "edgeward/v1/pi/cmd", "other/v1/pi/state",
                                   "edgeward/v1/pi/unknown", "edgeward/v1/../state"])
def test_foreign_topics_are_rejected(topic):
    with pytest.raises(ProtocolError):
        protocol.parse_topic(topic)


def test_messages_encode_and_decode_to_the_same_value():
    state = protocol.State(device="pi-01", online=True, models=[protocol.ModelInfo("digits", 3, "onnx")])
    back = protocol.decode(protocol.State, protocol.encode(state))
    assert back == state
    req = protocol.DeployRequest(bundle=protocol.BundleRef(sha256="0" * 64, size=10))
    assert protocol.decode(protocol.DeployRequest, protocol.encode(req)).bundle.size == 10


@pytest.mark.parametrize("payload, fragment", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[1,2]", "expected a JSON object"),
    (b'{"v": 2, "bundle": {"sha256": "' + b"0" * 64 + b'", "size": 1}}', "protocol version 2"),
    (b'{"bundle": {"sha256": "xyz", "size": 1}}', "bundle.sha256"),
    (b'{"bundle": {"sha256": "' + b"0" * 64 + b'", "size": -5}}', "bundle.size: must be >= 1"),
    (b'{"bundle": {"sha256": "' + b"0" * 64 + b'", "size": 5}, "evil": 1}', "evil: unknown key"),
    (b"{}", "bundle: required"),
])
def test_malformed_requests_are_protocol_errors(payload, fragment):
    with pytest.raises(ProtocolError) as err:
        protocol.decode(protocol.DeployRequest, payload)
    assert fragment in str(err.value)


def test_oversized_messages_are_refused_before_parsing():
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        protocol.decode(protocol.PingRequest, b"{" + b" " * 200 + b"}", max_bytes=100)


def test_tensor_frames_round_trip_exactly():
    tensors = {"image": np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32),
               "ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    frame = wire.pack_tensors(tensors, v=1, status="ok")
    header, back = wire.unpack_tensors(frame)
    assert header["status"] == "ok"
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
        assert back[k].dtype == tensors[k].dtype
    # binary, not JSON lists: the frame is barely bigger than the raw data
    assert len(frame) < sum(t.nbytes for t in tensors.values()) + 400


def _frame_with(spec: dict, body: bytes) -> bytes:
    return wire.pack({"v": 1, "tensors": [spec]}, body)


@pytest.mark.parametrize("frame, fragment", [
    (b"", "missing EWF1"),
    (b"EWF1\x00\x00\x00\xff{}", "does not fit"),
    (b"EWF1\x00\x00\x00\x02[]", "must be a JSON object"),
    (b"EWF1\x00\x00\x00\x03{x}", "not JSON"),
    (_frame_with({"name": "x", "dtype": "float32", "shape": [1000, 1000], "offset": 0, "nbytes": 4000000}, b"\0" * 16), "the frame holds"),
    (_frame_with({"name": "x", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 4}, b"\0" * 8), "is 8 bytes"),
    (_frame_with({"name": "x", "dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}, b"\0" * 8), "dtype"),
    (_frame_with({"name": "x", "dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4}, b"\0" * 4), "non-negative"),
    (_frame_with({"name": "x", "dtype": "float32", "shape": [1], "offset": 8, "nbytes": 4}, b"\0" * 4), "the frame holds"),
])
def test_hostile_frames_are_protocol_errors_not_crashes(frame, fragment):
    with pytest.raises(ProtocolError) as err:
        wire.unpack_tensors(frame)
    assert fragment in str(err.value)


def test_free_form_data_may_hold_nulls():
    """A first deploy has no previous version: {"previous_version": null} must decode."""
    reply = protocol.Reply(status="ok", data={"name": "digits", "version": 1, "previous_version": None})
    assert protocol.decode(protocol.Reply, protocol.encode(reply)).data["previous_version"] is None


def test_reply_carries_the_errors_code_and_text():
    reply = protocol.error_reply(ProtocolError("bad thing", "do the other thing"))
    data = json.loads(protocol.encode(reply))
    assert data == {"status": "error", "v": 1, "error": "bad thing: do the other thing", "code": "bad_message",
                    "data": {}, "corr": None}


def test_an_error_code_from_another_process_is_raised_as_its_own_class():
    """The worker's and the agent's error answers carry a code; the receiving end raises the
    class of that code, so callers catch a BusyError or an ImageError as if raised locally."""
    from agent import errors

    classes = [errors.BusyError, errors.ImageError, errors.InferenceError, errors.ModelNotFound,
               errors.ProtocolError, errors.SelfTestError, errors.WorkerCrashed, errors.IntegrityError]
    for cls in classes:
        assert errors.error_class(cls.code) is cls
    assert errors.error_class("no_such_code") is errors.EdgewardError
    assert errors.error_class(None) is errors.EdgewardError and errors.error_class(["busy"]) is errors.EdgewardError
