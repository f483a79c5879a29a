"""Everything a board or the workstation decodes from the network, fuzzed (hypothesis).

The property is the same for each decoder: whatever bytes arrive, it returns a value or
raises one of edgeward's own errors, whose one line names the problem. Any other exception
would reach the callers' catch-all: an "internal" answer and a traceback in the journal,
which a remote sender could repeat at will. The daemon's routing around these decoders
is covered with a real broker in tests/test_agent_mqtt.py.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent import protocol, wire
from agent.bundle import TensorSpec, open_bundle, parse_manifest
from agent.config import PipelineConfig
from agent.errors import EdgewardError, ModelNotFound
from agent.localapi import LocalApi
from agent.pipelines import Pipelines
from agent.tensors import ITEMSIZE, Tensor, check_inputs, from_frame, from_json

# The suite runs the same 300 cases per decoder each time; a deeper, random search:
#   EDGEWARD_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_hostile_input.py
DEEP = int(os.environ.get("EDGEWARD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 300, deadline=None, derandomize=not DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

# keys the decoders look for, so that generated objects get past the first check
FIELD_NAMES = sorted({"v", "reply_to", "corr", "bundle", "sha256", "size", "chunk_size", "url", "model", "name",
                      "version", "runtime", "load_mb", "runtime_mb", "index", "offset", "tensors", "dtype",
                      "shape", "nbytes", "op", "stream", "status", "inputs", "data", "code", "error"})
SHA = "ab" * 32
plausible = (json_values | st.sampled_from([SHA, "digits", 1, 0, -1, 2**31, 1024, sorted(ITEMSIZE)[0], "float32",
                                            [1, 2], [-1, 8], "https://x/y", "infer", "models", "route"]))
objects = st.recursive(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), plausible, max_size=6),
                       lambda inner: st.dictionaries(st.sampled_from(FIELD_NAMES), inner | plausible, max_size=4),
                       max_leaves=8)
tensor_specs = st.fixed_dictionaries({"name": st.text(max_size=4) | st.sampled_from(["x", "y"]),
                                      "dtype": st.sampled_from(sorted(ITEMSIZE)) | json_scalars,
                                      "shape": st.lists(st.integers(-2, 2**32), max_size=4) | json_values,
                                      "offset": st.integers(-4, 64) | json_scalars,
                                      "nbytes": st.integers(-4, 64) | json_scalars})
frame_headers = st.fixed_dictionaries({"tensors": st.lists(tensor_specs, max_size=3) | json_values},
                                      optional={"v": st.integers(0, 2) | json_scalars,
                                                "op": st.sampled_from(["infer", "models", "route", "reset", "x"]),
                                                "model": st.sampled_from(["m", "nope"]) | json_scalars,
                                                "stream": st.text(max_size=4) | json_scalars,
                                                "reply_to": json_scalars, "corr": json_scalars})


def frame(header_bytes: bytes, body: bytes = b"") -> bytes:
    return wire.MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes + body


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


# Inputs no generator is likely to reach: each once made Python's own parser raise
# something other than a JSON error (RecursionError, ValueError for > 4300 digits).
NASTY_JSON = [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000, b'{"v": ' + b"9" * 5000 + b"}",
              b'{"size": 1e999999}', b'\xff\xfe{"v": 1}', b'{"v": 1, "v": 2}', b"NaN", b'"\\ud800"']


def expect_own_error(fn, *args):
    """Run fn; anything raised must be edgeward's own error with a message."""
    try:
        return fn(*args)
    except EdgewardError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


# ---------------------------------------------------------------- MQTT commands and replies

DECODED = [*protocol.COMMANDS.values(), protocol.Reply, protocol.State, protocol.Telemetry, protocol.Event]


@pytest.mark.parametrize("cls", DECODED, ids=lambda c: c.__name__)
@FUZZ
@given(payload=st.binary(max_size=64) | objects.map(json_bytes) | json_values.map(json_bytes))
def test_every_message_the_agent_or_fleet_decodes_fails_only_with_a_protocol_error(cls, payload):
    expect_own_error(protocol.decode, cls, payload, 1 << 20)


@pytest.mark.parametrize("payload", NASTY_JSON, ids=range(len(NASTY_JSON)))
@pytest.mark.parametrize("cls", DECODED, ids=lambda c: c.__name__)
def test_pathological_json_is_a_protocol_error(cls, payload):
    expect_own_error(protocol.decode, cls, payload, 1 << 20)


# ---------------------------------------------------------------- binary frames and tensors

@FUZZ
@given(payload=st.binary(max_size=80) | st.builds(frame, st.binary(max_size=40), st.binary(max_size=16))
       | st.builds(frame, frame_headers.map(json_bytes), st.binary(max_size=64)))
def test_frames_and_their_tensors_fail_only_with_protocol_errors(payload):
    got = expect_own_error(wire.unpack, payload, 1 << 20)
    if got is None:
        return
    header, body = got
    tensors = expect_own_error(from_frame, header, body)
    for cls in (protocol.InferHeader, protocol.ChunkHeader):
        expect_own_error(protocol.from_fields, cls, header, "header")
    if tensors:
        specs = [TensorSpec("x", "float32", [-1, 2]), TensorSpec("y", "int8", [1, 3])]
        expect_own_error(check_inputs, "m", specs, tensors, 8)
        expect_own_error(check_inputs, "m", specs[:1], tensors)


@pytest.mark.parametrize("header", NASTY_JSON, ids=range(len(NASTY_JSON)))
def test_a_frame_with_a_pathological_header_is_a_protocol_error(header):
    expect_own_error(wire.unpack, frame(header[:wire.MAX_HEADER_BYTES]))


@FUZZ
@given(value=json_values, dtype=st.sampled_from(sorted(ITEMSIZE)))
def test_json_tensors_of_any_shape_and_value_fail_only_with_inference_errors(value, dtype):
    t = expect_own_error(from_json, "x", value, dtype)
    if t is not None:
        assert len(t.data) == t.nbytes  # what it packs is what its shape says


# ---------------------------------------------------------------- the local API and MQTT pipelines

class _Model:
    name, version, mode = "m", 1, "streaming"
    classes, detections = [], []
    request_inputs = [TensorSpec("x", "float32", [-1, 2])]
    reply_outputs = [TensorSpec("y", "float32", [-1, 2])]
    direct_socket = None

    def reset_stream(self, stream):  # a model without state has no streams to forget
        return False

    def where(self):
        return {"runtime": "onnxruntime", "file": "/nonexistent/model.onnx", "pid": 0, "providers": [],
                "max_batch": 1, "max_delay_ms": 0.0, "preprocessing": {}}


class _Engine:
    """The engine's surface the local API and pipelines use; inputs checked as the real one does."""

    threads = 1

    def get(self, name):
        if name != "m":
            raise ModelNotFound(f"no model named {name!r} is serving")
        return _Model()

    def models(self):
        return [_Model()]

    def infer(self, name, tensors, stream=None):
        model = self.get(name)
        (x,) = check_inputs(name, model.request_inputs, tensors)
        return model, [Tensor("y", "float32", x.shape, bytes(x.data))]


@FUZZ
@given(payload=st.binary(max_size=64) | st.builds(frame, frame_headers.map(json_bytes), st.binary(max_size=64))
       | st.builds(frame, objects.map(json_bytes)) | st.sampled_from([frame(j) for j in NASTY_JSON]))
def test_the_local_api_answers_anything_with_a_clear_error_never_an_internal_one(payload):
    header, _ = wire.unpack(LocalApi("/nonexistent", _Engine()).handle(payload))
    assert header["status"] in ("ok", "error")
    assert header.get("code") != "internal", header


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    from agent.direct import DirectServer

    engine = _Engine()
    srv = DirectServer(str(tmp_path_factory.mktemp("direct") / "m.sock"), 0o600, "m", 1, _Model.request_inputs,
                       lambda feeds: engine.infer("m", feeds)[1])
    yield srv
    srv.close()


@FUZZ
@given(payload=st.binary(max_size=64) | st.builds(frame, frame_headers.map(json_bytes), st.binary(max_size=64))
       | st.builds(frame, objects.map(json_bytes)) | st.sampled_from([frame(j) for j in NASTY_JSON]))
def test_a_models_own_socket_answers_anything_with_a_clear_error_never_an_internal_one(direct, payload):
    header, _ = wire.unpack(direct.handle(payload))
    assert header["status"] in ("ok", "error")
    assert header.get("code") != "internal", header


@pytest.fixture(scope="module")
def stateful_direct(tmp_path_factory):
    """A stateful model's worker socket: each stream id reaches the run, checked first."""
    from agent.direct import DirectServer

    engine, seen = _Engine(), []

    def on_stream(feeds, stream):
        assert stream is None or (isinstance(stream, str) and 0 < len(stream) <= 256)
        seen.append(stream)
        return engine.infer("m", feeds)[1]

    srv = DirectServer(str(tmp_path_factory.mktemp("direct-s") / "m.sock"), 0o600, "m", 1, _Model.request_inputs,
                       lambda feeds: engine.infer("m", feeds)[1], run_stream=on_stream)
    yield srv, seen
    srv.close()


@FUZZ
@given(payload=st.builds(frame, frame_headers.map(json_bytes), st.binary(max_size=64)))
def test_a_stateful_models_socket_takes_only_sane_stream_ids(stateful_direct, payload):
    srv, _ = stateful_direct
    header, _ = wire.unpack(srv.handle(payload))
    assert header["status"] in ("ok", "error")
    assert header.get("code") != "internal", header


@FUZZ
@given(rows=st.integers(1, 6), name=st.sampled_from(["x", "other"]), offset=st.integers(0, 12),
       body=st.binary(max_size=80))
def test_a_header_seen_before_is_checked_against_each_new_body(direct, rows, name, offset, body):
    """The model socket keeps what it checked per header (agent/direct.py): the same header with
    another body must give that body's answer, or the error a first sight of it would give."""
    head = json_bytes({"v": protocol.VERSION, "op": "infer", "model": "m", "tensors": [
        {"name": name, "dtype": "float32", "shape": [rows, 2], "offset": offset, "nbytes": rows * 8}]})
    answers = [wire.unpack(direct.handle(frame(head, body))) for _ in range(2)]  # the second from the cache
    fits = offset + rows * 8 <= len(body)
    for header, out in answers:
        assert header["status"] == ("ok" if fits else "error"), header
        if fits:
            (t,) = from_frame(header, out)
            assert bytes(t.data) == body[offset:offset + rows * 8]  # this body's values, not an earlier one's
        else:
            assert header["code"] == "bad_message" and "the frame holds" in header["error"]


@pytest.fixture(scope="module")
def attached(direct):
    """A connection's shared-memory regions (agent/shm.py) as the worker holds them: 64 kB each."""
    from agent import shm

    att = shm.Attachment(1 << 20)
    for use in ("requests", "answers"):
        region = shm.Region(1 << 16)
        msg = wire.pack({"v": protocol.VERSION, "op": "attach", "use": use})
        assert wire.unpack(att.attach(msg, [os.dup(region.fd)]))[0]["status"] == "ok"
        region.close()
    return att


shm_headers = frame_headers.flatmap(lambda h: st.fixed_dictionaries(
    {}, optional={"shm": json_scalars, "answer_shm": json_scalars}).map(lambda extra: {**h, **extra}))
# nearly right: the model's own input, with rows, offsets and sizes around the 64 kB regions' ends
near_shm_headers = st.fixed_dictionaries({
    "v": st.just(protocol.VERSION), "op": st.just("infer"), "model": st.just("m"),
    "shm": st.booleans(), "answer_shm": st.booleans(),
    "tensors": st.lists(st.fixed_dictionaries({
        "name": st.just("x"), "dtype": st.just("float32"),
        "shape": st.tuples(st.integers(-1, 9000), st.just(2)).map(list),
        "offset": st.integers(-8, 1 << 16) | st.sampled_from([0, (1 << 16) - 8, 1 << 16]),
        "nbytes": st.integers(0, 1 << 17) | st.sampled_from([8, 8192 * 8, 1 << 16])}), min_size=1, max_size=2)})


@FUZZ
@given(payload=st.builds(frame, (shm_headers | near_shm_headers).map(json_bytes), st.binary(max_size=64)))
def test_requests_in_shared_memory_get_a_clear_error_never_an_internal_one(direct, attached, payload):
    """Offsets, sizes and flags of any kind, against a real attached request and answer region."""
    header, body = wire.unpack(direct.handle(payload, None, attached))
    assert header["status"] in ("ok", "error")
    assert header.get("code") != "internal", header
    if header["status"] == "ok":  # the answer is whole: in the answer region, or inline
        (spec,) = header["tensors"]
        assert spec["offset"] + spec["nbytes"] <= (len(attached.answers) if header.get("shm") else len(body))


@pytest.mark.parametrize("fmt", ["json", "binary", "raw"])
@FUZZ
@given(payload=st.binary(max_size=64) | json_values.map(json_bytes) | objects.map(json_bytes)
       | st.builds(frame, frame_headers.map(json_bytes), st.binary(max_size=64)) | st.sampled_from(NASTY_JSON))
def test_a_pipeline_answers_anything_with_a_clear_error_never_an_internal_one(fmt, payload):
    sent = []
    pipes = Pipelines([PipelineConfig("in/x", "m", "out/x", fmt)], _Engine(), lambda t, p, q: sent.append(p), 1 << 20)
    pipes.handle(pipes.configs[0], payload)
    (out,) = sent
    header = wire.unpack(out)[0] if out[:4] == wire.MAGIC else json.loads(out)
    assert header.get("code") != "internal", header


# ---------------------------------------------------------------- bundles from the network

@FUZZ
@given(obj=objects, extra=st.dictionaries(st.sampled_from(["name", "version", "format", "model_file", "runtime",
                                                            "files", "inputs", "outputs", "memory", "self_test",
                                                            "schema", "state"]), plausible, max_size=6))
def test_a_manifest_of_any_shape_fails_only_with_a_bundle_error(obj, extra):
    expect_own_error(parse_manifest, json_bytes({**obj, **extra}))


@pytest.mark.parametrize("raw", NASTY_JSON, ids=range(len(NASTY_JSON)))
def test_a_pathological_manifest_is_a_bundle_error(raw):
    expect_own_error(parse_manifest, raw)


@settings(max_examples=DEEP // 10 or 60, deadline=None, derandomize=not DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_or_truncated_bundle_fails_only_with_a_bundle_error(assets, tmp_path, data):
    from agent.signing import load_public_key

    raw = bytearray(assets.v1.read_bytes())
    cut = data.draw(st.none() | st.integers(0, len(raw)), label="truncate at")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), max_size=4),
                      label="xor bytes")
    for at, mask in flips:
        raw[at] ^= mask
    if cut is not None:
        raw = raw[:cut]
    assume(cut is not None or flips)
    path = tmp_path / "damaged.ewb"
    path.write_bytes(bytes(raw))
    expect_own_error(open_bundle, path, [load_public_key(assets.pub)])


# ---------------------------------------------------------------- what the fleet side reads from boards

def test_reports_from_newer_agents_are_read_and_commands_with_unknown_keys_refused():
    """A fleet halfway through an agent upgrade: the workstation's tools still read the new agents."""
    newer = {"device": "pi-01", "v": protocol.VERSION, "rss_mb": 41.5, "battery_pct": 80,
             "models": {"kws": {"version": 3, "requests": 10, "npu_util": 0.5}}}
    t = protocol.decode(protocol.Telemetry, json_bytes(newer))
    assert t.rss_mb == 41.5 and t.models["kws"].requests == 10
    s = protocol.decode(protocol.State, json_bytes({"device": "pi-01", "online": True, "hardware": {"npu": "x"},
                                                    "models": [{"name": "kws", "version": 3, "format": "onnx",
                                                                "quantized_by": "y"}]}))
    assert s.models[0].version == 3
    with pytest.raises(EdgewardError, match="npu_cores: unknown key"):
        protocol.decode(protocol.PingRequest, json_bytes({"npu_cores": 2}))
    with pytest.raises(EdgewardError, match="bundle.mirror: unknown key"):
        protocol.decode(protocol.DeployRequest, json_bytes({"bundle": {"sha256": SHA, "size": 1, "mirror": "x"}}))


def test_fleet_watch_skips_what_does_not_fit_its_schema_and_goes_on(broker, caplog):
    from agent.config import MqttConfig
    from agent.fleet import Fleet
    from mqttkit import RawClient

    raw = RawClient(broker.port)
    topic = protocol.telemetry_topic("pi-01")
    stop, got = threading.Event(), []
    with Fleet(MqttConfig(url=broker.url)) as fleet:
        def watch():
            for item in fleet.watch(stop, kinds=("telemetry", "events")):
                got.append(item)
        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        time.sleep(0.5)  # subscribed
        for bad in [b"[" * 5000, b'{"device": "pi-01", "models": 5}', b'{"device": "pi-01", "ts": "soon"}',
                    b"\xff\x00", b'{"v": 2, "device": "pi-01"}', b"[]"]:
            raw.publish(topic, bad)
        raw.publish(topic, json_bytes({"device": "pi-01", "rss_mb": 40.0, "battery_pct": 80}))
        raw.publish(protocol.events_topic("pi-01"),
                    json_bytes({"device": "pi-01", "kind": "model_loaded", "message": "kws v3"}))
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        reader.join(5)
    assert [(d, k) for d, k, _ in got] == [("pi-01", "telemetry"), ("pi-01", "events")]
    telemetry = got[0][2]
    assert telemetry["rss_mb"] == 40.0 and telemetry["models"] == {} and "battery_pct" not in telemetry
    assert got[1][2]["level"] == "info"  # defaults filled in: the watch table can rely on every key
    warnings = [r.getMessage() for r in caplog.records if "not valid reports" in r.getMessage()]
    assert len(warnings) == 1 and topic in warnings[0]  # said once, not once per bad message
    raw.close()
