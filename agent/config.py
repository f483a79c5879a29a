"""The agent's configuration: typed, loaded from YAML in one place, validated at start-up.

Every key has a default that works for a quick start, so a config file is optional:
``edgeward agent --broker mqtt://localhost:1883 --store ./store`` is enough.
A bad value stops the agent before it does anything, naming the key path and what is allowed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from .errors import ConfigError
from .schema import SchemaError, from_dict, rule

DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


@dataclass
class DeviceConfig:
    id: str = field(default="", metadata=rule(pattern=f"|{DEVICE_ID_PATTERN}",
                                              doc="defaults to the host name"))
    groups: list[str] = field(default_factory=list)


@dataclass
class TlsConfig:
    ca_file: Optional[str] = None     # None: the system's CA store
    cert_file: Optional[str] = None   # client certificate, for brokers that require one
    key_file: Optional[str] = None


@dataclass
class MqttConfig:
    url: str = "mqtt://localhost:1883"  # mqtts:// turns TLS on
    username: Optional[str] = None
    password_file: Optional[str] = None  # never the password itself in the YAML
    tls: TlsConfig = field(default_factory=TlsConfig)
    keepalive_s: int = field(default=30, metadata=rule(min=5, max=3600))
    reconnect_min_s: int = field(default=1, metadata=rule(min=1, max=60))
    reconnect_max_s: int = field(default=60, metadata=rule(min=1, max=3600))
    max_payload_kb: int = field(default=1024, metadata=rule(min=1, max=262144))

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "localhost"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def uses_tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"


@dataclass
class StoreConfig:
    path: str = "/var/lib/edgeward"
    keep_versions: int = field(default=3, metadata=rule(min=1, max=100))
    max_bundle_mb: int = field(default=512, metadata=rule(min=1, max=65536))
    download_ca_file: Optional[str] = None  # CA bundle for https bundle URLs; default: the system's


@dataclass
class MemoryConfig:
    budget_mb: int = field(default=256, metadata=rule(min=16, max=1 << 20))
    # The system must keep at least this much available after a load, whatever the budget says.
    reserve_mb: int = field(default=64, metadata=rule(min=0, max=1 << 20))
    # When a load does not fit, unload the least recently used model idle at least this long
    # (it reloads on its next request). 0: never evict; a load that does not fit is refused.
    evict_idle_s: float = field(default=0.0, metadata=rule(min=0, max=86400 * 365))


@dataclass
class TrustConfig:
    keys: list[str] = field(default_factory=list)  # paths of trusted ed25519 public keys (PEM)
    allow_unsigned: bool = False


@dataclass
class TelemetryConfig:
    interval_s: float = field(default=10.0, metadata=rule(min=0.2, max=86400))
    # telemetry and events kept on disk while the broker is unreachable; oldest telemetry dropped first
    spool_mb: int = field(default=16, metadata=rule(min=1, max=4096))


@dataclass
class HomeAssistantConfig:
    """Opt-in MQTT discovery: the board, its sensors and its models' versions appear in Home Assistant."""
    enabled: bool = False
    prefix: str = field(default="homeassistant", metadata=rule(pattern=r"[A-Za-z0-9_/-]{1,64}"))


@dataclass
class InferenceConfig:
    threads: int = field(default=1, metadata=rule(min=1, max=64))      # the runtime's threads per model
    workers: int = field(default=2, metadata=rule(min=1, max=64))      # MQTT requests handled at once
    timeout_s: float = field(default=30.0, metadata=rule(min=0.1, max=3600))  # a model run longer is stopped
    # onnxruntime execution providers to use when this build has them, e.g. on a Jetson
    # [TensorrtExecutionProvider, CUDAExecutionProvider]; the CPU is always the fallback
    providers: list[str] = field(default_factory=list)


@dataclass
class ApiConfig:
    """The local Unix-socket API for apps on the board (binary tensors; client: agent.client.LocalClient)."""
    socket: str = ""   # "" = <store.path>/agent.sock; the service uses /run/edgeward/agent.sock; "off" = none
    socket_mode: int = field(default=0o660, metadata=rule(min=0, max=0o777))
    max_pending: int = field(default=256, metadata=rule(min=1, max=100_000))  # beyond it callers get "busy"
    # after answering, poll this long for the caller's next request before sleeping (0: never);
    # saves a wake-up per request for apps that call back to back, costs at most this much CPU per request
    spin_us: int = field(default=200, metadata=rule(min=0, max=10_000))
    # the largest request taken, on this socket and the models' own: a message's bytes are
    # held in memory until it is whole, so this bounds what one caller can make the agent hold
    max_request_mb: int = field(default=64, metadata=rule(min=1, max=256))
    # what requests may hold together, per socket (the agent's, each model's): past it, callers get "busy"
    max_held_mb: int = field(default=128, metadata=rule(min=1, max=65536))


@dataclass
class ServingConfig:
    """How one model takes requests: at once (streaming), or gathered into micro-batches."""
    mode: str = field(default="streaming", metadata=rule(choices=("streaming", "batched")))
    max_batch: int = field(default=32, metadata=rule(min=1, max=4096))
    max_delay_ms: float = field(default=2.0, metadata=rule(min=0, max=10_000))
    preferred_batch: list[int] = field(default_factory=list)  # e.g. [8, 16, 32]: run these sizes when possible
    max_queue: int = field(default=1024, metadata=rule(min=1, max=1_000_000))  # rows waiting; beyond: "busy"
    # batches run at once (0: one per core the model's intra-op threads leave, at most 4; TFLite: 2 on one
    # interpreter, the second gathering while the first runs). N > 0 for TFLite keeps N interpreters.
    batches_in_flight: int = field(default=0, metadata=rule(min=0, max=64))
    max_streams: int = field(default=1024, metadata=rule(min=1, max=1_000_000))  # stateful streams kept


@dataclass
class PipelineConfig:
    """An MQTT pipeline: messages on input_topic run model; answers go to output_topic (agent/pipelines.py)."""
    input_topic: str
    model: str
    output_topic: str
    format: str = field(default="json", metadata=rule(choices=("json", "binary", "image", "raw")))
    qos: int = field(default=1, metadata=rule(min=0, max=2))
    preprocess: str | None = None  # format image: how images become the input, if not as the bundle says
    stream_from_topic: bool = False  # a stateful model: each message's topic names its stream (mic/kitchen/...)


@dataclass
class AgentConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)        # the default for every model
    models: dict[str, ServingConfig] = field(default_factory=dict)       # per model name, overriding it
    pipelines: list[PipelineConfig] = field(default_factory=list)
    log_level: str = field(default="info", metadata=rule(choices=("debug", "info", "warning", "error")))

    @property
    def device_id(self) -> str:
        return self.device.id

    @property
    def api_socket(self) -> str | None:
        """Where the local API listens, or None when it is turned off."""
        if self.api.socket == "off":
            return None
        return self.api.socket or str(Path(self.store.path) / "agent.sock")

    def serving_for(self, model: str) -> ServingConfig:
        return self.models.get(model, self.serving)


def _check_semantics(cfg: AgentConfig) -> None:
    """Rules that span keys or touch the file system."""
    parsed = urlparse(cfg.mqtt.url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"mqtt.url: {cfg.mqtt.url!r} is not a broker URL",
                          "use mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        raise ConfigError("mqtt.reconnect_max_s: must be >= mqtt.reconnect_min_s")
    for key, value in (("mqtt.password_file", cfg.mqtt.password_file),
                       ("mqtt.tls.ca_file", cfg.mqtt.tls.ca_file),
                       ("mqtt.tls.cert_file", cfg.mqtt.tls.cert_file),
                       ("mqtt.tls.key_file", cfg.mqtt.tls.key_file),
                       ("store.download_ca_file", cfg.store.download_ca_file)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: file {value!r} does not exist")
    for i, key in enumerate(cfg.trust.keys):
        if not Path(key).is_file():
            raise ConfigError(f"trust.keys[{i}]: file {key!r} does not exist",
                              "make one with `edgeward keys gen` and copy the .pub file to the board")
    if not cfg.trust.keys and not cfg.trust.allow_unsigned:
        raise ConfigError("trust.keys: no trusted public key configured, so every bundle would be refused",
                          "pass --trust-key FILE (or set trust.allow_unsigned: true for development only)")
    from paho.mqtt.client import topic_matches_sub

    for i, pipe in enumerate(cfg.pipelines):
        if not pipe.input_topic or not pipe.output_topic or "#" in pipe.output_topic or "+" in pipe.output_topic:
            raise ConfigError(f"pipelines[{i}]: needs an input_topic and a concrete output_topic (no wildcards)")
        if any(topic_matches_sub(pipe.input_topic, p.output_topic) for p in cfg.pipelines):
            raise ConfigError(f"pipelines[{i}]: input_topic {pipe.input_topic!r} would take a pipeline's own answers",
                              "use different topics for inputs and outputs")
        if pipe.stream_from_topic and pipe.format == "image":
            raise ConfigError(f"pipelines[{i}]: stream_from_topic is for stateful models, and images carry no "
                              "stream", "drop stream_from_topic, or use format: json, binary or raw")
        if pipe.preprocess is not None and pipe.format != "image":
            raise ConfigError(f"pipelines[{i}]: preprocess is for format: image (this pipeline's is {pipe.format})",
                              "drop preprocess, or set format: image")
    for name, serving in cfg.models.items():
        if any(b < 1 or b > serving.max_batch for b in serving.preferred_batch):
            raise ConfigError(f"models.{name}.preferred_batch: sizes must lie in 1..max_batch ({serving.max_batch})")
    if any(b < 1 or b > cfg.serving.max_batch for b in cfg.serving.preferred_batch):
        raise ConfigError(f"serving.preferred_batch: sizes must lie in 1..max_batch ({cfg.serving.max_batch})")
    if cfg.memory.budget_mb <= 0:
        raise ConfigError("memory.budget_mb: must be positive")


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                check_files: bool = True) -> AgentConfig:
    """Read YAML (optional), apply CLI overrides given as dotted keys, validate everything.

    `check_files=False` skips the checks that only matter for running the daemon (key files
    exist, a trusted key is configured), for read-only commands such as `agent status`.
    """
    raw: dict = {}
    if path is not None:
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: cannot override, {part} is not a section in {path}")
        node[leaf] = value
    try:
        cfg = from_dict(AgentConfig, raw)
    except SchemaError as exc:
        raise ConfigError(str(exc), f"fix it in {path}" if path else None) from exc
    if not cfg.device.id:
        cfg.device.id = socket.gethostname().split(".")[0] or "edgeward"
    if check_files:
        _check_semantics(cfg)
    return cfg


def example_yaml() -> str:
    """An example configuration with every key at its default, generated from the defaults so it never goes stale."""
    from .schema import to_dict

    import yaml

    return yaml.safe_dump(to_dict(AgentConfig()), sort_keys=False)


__all__ = ["AgentConfig", "load_config", "example_yaml", "DEVICE_ID_PATTERN"]
