"""The MQTT protocol between boards and the fleet: topics and message schemas, defined once.

Both ends import this module: the agent to publish and to validate what it receives,
the fleet CLI to do the same in the other direction. Tests check both against it.

Topics (``<p>`` is ``edgeward/v1``)::

    <p>/<device>/state            retained birth/death message with the inventory and models
    <p>/<device>/telemetry        periodic system and per-model metrics
    <p>/<device>/events           loads, refusals, update steps (QoS 1)
    <p>/<device>/cmd/<verb>       commands; the answer goes to the MQTT v5 response topic
    <p>/<device>/upload/<sha256>  bundle chunks for a deploy in progress (binary frames)
    <p>/<device>/infer/<model>    inference requests (binary frames); answer to the response topic
    <p>/reply/<client>            where fleet clients ask their answers to be sent

JSON messages carry ``"v": 1``; a receiver refuses other major versions with a clear error.
MQTT 3.1.1 fallback: a request may carry ``reply_to`` and ``corr`` in its JSON (or frame header)
instead of the v5 response-topic and correlation-data properties.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ProtocolError
from .schema import SchemaError, from_dict, rule, to_dict

VERSION = 1
PREFIX = f"edgeward/v{VERSION}"
SHA256_PATTERN = r"[0-9a-f]{64}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


# ---------------------------------------------------------------- topics

def state_topic(device: str) -> str:
    return f"{PREFIX}/{device}/state"


def telemetry_topic(device: str) -> str:
    return f"{PREFIX}/{device}/telemetry"


def events_topic(device: str) -> str:
    return f"{PREFIX}/{device}/events"


def cmd_topic(device: str, verb: str) -> str:
    return f"{PREFIX}/{device}/cmd/{verb}"


def upload_topic(device: str, sha256: str) -> str:
    return f"{PREFIX}/{device}/upload/{sha256}"


def infer_topic(device: str, model: str) -> str:
    return f"{PREFIX}/{device}/infer/{model}"


def reply_topic(client_id: str) -> str:
    return f"{PREFIX}/reply/{client_id}"


def device_subscriptions(device: str) -> list[str]:
    """What an agent subscribes to: its own commands, uploads and inference requests."""
    return [f"{PREFIX}/{device}/cmd/+", f"{PREFIX}/{device}/upload/+", f"{PREFIX}/{device}/infer/+"]


_TOPIC_RE = re.compile(rf"^{re.escape(PREFIX)}/({NAME_PATTERN})/(state|telemetry|events|cmd|upload|infer)(?:/([^/]+))?$")


@dataclass(frozen=True)
class Topic:
    device: str
    kind: str
    arg: Optional[str]


def parse_topic(topic: str) -> Topic:
    m = _TOPIC_RE.match(topic)
    if not m:
        raise ProtocolError(f"topic {topic!r} is not an edgeward v{VERSION} topic")
    device, kind, arg = m.groups()
    if kind in ("cmd", "upload", "infer") and not arg:
        raise ProtocolError(f"topic {topic!r} needs a {kind} argument")
    return Topic(device, kind, arg)


# ---------------------------------------------------------------- messages

@dataclass
class ModelInfo:
    name: str
    version: int
    format: str
    health: Literal["serving", "loading", "failed"] = "serving"
    cost_mb: float = 0.0
    sha256: str = ""


@dataclass
class Hardware:
    machine: str = ""
    model: str = ""                  # the board's name where the firmware gives one
    cpu_count: int = 0
    ram_mb: int = 0
    os: str = ""
    python: str = ""


@dataclass
class State:
    """Retained on <device>/state: the birth message when online, the last will when not."""
    device: str
    online: bool
    ts: float = field(default_factory=time.time)
    v: int = VERSION
    agent_version: str = ""
    groups: list[str] = field(default_factory=list)
    hardware: Hardware = field(default_factory=Hardware)
    runtimes: list[str] = field(default_factory=list)
    budget_mb: int = 0
    models: list[ModelInfo] = field(default_factory=list)


@dataclass
class ModelStats:
    version: int
    requests: int = 0
    errors: int = 0
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None


@dataclass
class Telemetry:
    device: str
    ts: float = field(default_factory=time.time)
    v: int = VERSION
    uptime_s: float = 0.0
    rss_mb: float = 0.0
    cpu_percent: float = 0.0
    available_mb: float = 0.0
    budget_mb: int = 0
    models: dict[str, ModelStats] = field(default_factory=dict)
    spool_queued: int = 0            # messages waiting on disk for the broker
    spool_dropped: int = 0           # dropped since the spool was created, because it was full


@dataclass
class Event:
    device: str
    kind: str                        # model_loaded, load_refused, deploy_* ...
    message: str
    level: Literal["info", "warning", "error"] = "info"
    ts: float = field(default_factory=time.time)
    v: int = VERSION
    model: Optional[str] = None
    version: Optional[int] = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class BundleRef:
    sha256: str = field(metadata=rule(pattern=SHA256_PATTERN))
    size: int = field(metadata=rule(min=1))


@dataclass
class DeployRequest:
    """Asks a device to take a bundle; the bytes follow as chunks on <device>/upload/<sha256>."""
    bundle: BundleRef
    chunk_size: int = field(default=256 * 1024, metadata=rule(min=1024, max=16 * 1024 * 1024))
    v: int = VERSION
    reply_to: Optional[str] = None
    corr: Optional[str] = None


@dataclass
class PingRequest:
    v: int = VERSION
    reply_to: Optional[str] = None
    corr: Optional[str] = None


@dataclass
class RollbackRequest:
    """Go back to an installed older version (the previous one unless `version` names one).
    The one way past anti-rollback, and only to versions still kept in the device's store."""
    model: str = field(metadata=rule(pattern=NAME_PATTERN))
    version: Optional[int] = field(default=None, metadata=rule(min=1))
    v: int = VERSION
    reply_to: Optional[str] = None
    corr: Optional[str] = None


COMMANDS: dict[str, type] = {"deploy": DeployRequest, "ping": PingRequest, "rollback": RollbackRequest}


@dataclass
class Reply:
    """The answer to any command. A deploy gets `progress` replies, then one final ok/error."""
    status: Literal["ok", "error", "progress"]
    v: int = VERSION
    error: Optional[str] = None
    code: Optional[str] = None
    data: dict[str, Any] = field(default_factory=dict)
    corr: Optional[str] = None       # echoed for MQTT 3.1.1 requesters only

    @property
    def final(self) -> bool:
        return self.status != "progress"


@dataclass
class ChunkHeader:
    """Frame header of one bundle chunk on <device>/upload/<sha256>."""
    index: int = field(metadata=rule(min=0))
    offset: int = field(metadata=rule(min=0))
    v: int = VERSION


@dataclass
class InferHeader:
    """Frame header of an inference request; tensors follow in the frame body."""
    tensors: list[dict[str, Any]] = field(default_factory=list)
    v: int = VERSION
    reply_to: Optional[str] = None
    corr: Optional[str] = None


# ---------------------------------------------------------------- encode / decode

def encode(msg: Any) -> bytes:
    return json.dumps(to_dict(msg), separators=(",", ":")).encode()


def check_version(data: dict) -> None:
    v = data.get("v", VERSION)
    if v != VERSION:
        raise ProtocolError(f"message is protocol version {v!r}, this side speaks {VERSION}",
                            "upgrade the older side so both speak the same version")


def from_fields(cls: type, data: Any, what: str):
    """Validate an already-parsed dict (e.g. a frame header) against a schema."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    check_version(data)
    try:
        return from_dict(cls, data)
    except SchemaError as exc:
        raise ProtocolError(f"{what}: {exc}") from exc


def decode(cls: type, payload: bytes, max_bytes: int | None = None, what: str | None = None):
    """Parse and validate one JSON message; anything wrong is a ProtocolError naming the field."""
    what = what or cls.__name__
    if max_bytes is not None and len(payload) > max_bytes:
        raise ProtocolError(f"{what} of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON ({exc.__class__.__name__})") from exc
    return from_fields(cls, data, what)


def error_reply(exc: BaseException) -> Reply:
    """The reply for a failure: the error's own one-line text and its stable code."""
    code = getattr(exc, "code", "internal")
    return Reply(status="error", error=str(exc) or exc.__class__.__name__, code=code)
