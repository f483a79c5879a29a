"""The fleet controller: the workstation's end of the agent protocol.

It lists devices from their retained state messages, sends commands and inference
requests as MQTT v5 requests (response topic + correlation data) and streams
bundles to devices in chunks. It uses the same topic helpers, schemas and frames
as the agent (protocol.py, wire.py), so the two ends cannot drift apart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import protocol, wire
from .bundle import open_bundle, sha256_file
from .config import MqttConfig
from .errors import FleetError, ProtocolError
from .link import make_client, new_client_id, request_properties
from .protocol import Event, Reply, State, Telemetry
from .schema import to_dict

log = logging.getLogger(__name__)
_REPORTS = {"state": State, "telemetry": Telemetry, "events": Event}  # what `watch` yields, by topic kind


class Fleet:
    """A connected fleet client. Use as a context manager."""

    def __init__(self, mqtt: MqttConfig, connect_timeout: float = 10.0):
        self.cfg = mqtt
        self.client_id = new_client_id("fleet")
        self.reply_topic = protocol.reply_topic(self.client_id)
        self._pending: dict[bytes, queue.Queue] = {}
        self._listeners: list[Callable] = []
        self._connected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        client = make_client(self.client_id, mqtt)
        client.on_connect = lambda c, u, f, rc, p: (self._connected.set() if not rc.is_failure else None)
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        try:
            client.connect(mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s)
        except OSError as exc:
            raise FleetError(f"cannot reach the broker at {mqtt.url}: {exc.strerror or exc}",
                             "check --broker (or EDGEWARD_BROKER) and that the broker is running") from exc
        client.loop_start()
        self._client = client
        if not self._connected.wait(connect_timeout):
            self.close()
            raise FleetError(f"the broker at {mqtt.url} did not accept the connection",
                             "check the credentials and TLS settings")
        self.subscribe(self.reply_topic)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------ plumbing

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            ev = self._acks.pop(mid, None)
        if ev is not None:
            ev.set()

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        """Subscribe and wait for the broker's acknowledgement, so no answer can be missed."""
        ev = threading.Event()
        with self._lock:
            _, mid = self._client.subscribe(topic, qos=1)
            self._acks[mid] = ev
        if not ev.wait(timeout):
            raise FleetError(f"the broker did not acknowledge the subscription to {topic}")

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.reply_topic:
            corr = getattr(msg.properties, "CorrelationData", None)
            q = self._pending.get(corr)
            if q is not None:
                q.put(msg.payload)
            return
        for listener in list(self._listeners):
            try:
                listener(msg)
            except Exception:  # a display bug must not kill the network thread
                pass

    def _request(self, topic: str, payload: bytes) -> tuple[bytes, queue.Queue]:
        corr = uuid.uuid4().bytes
        q: queue.Queue = queue.Queue()
        self._pending[corr] = q
        self._client.publish(topic, payload, qos=1, properties=request_properties(self.reply_topic, corr))
        return corr, q

    @staticmethod
    def _wait(q: queue.Queue, timeout: float, what: str) -> bytes:
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise FleetError(f"no answer to {what} within {timeout:.0f} s",
                             "is the device online? check `edgeward fleet ls`") from None

    def command(self, device: str, verb: str, request, timeout: float = 10.0) -> Reply:
        corr, q = self._request(protocol.cmd_topic(device, verb), protocol.encode(request))
        try:
            return protocol.decode(Reply, self._wait(q, timeout, f"{verb} on {device}"))
        finally:
            self._pending.pop(corr, None)

    # ------------------------------------------------------------ what users call

    def devices(self, quiet_s: float = 0.5, max_wait_s: float = 3.0) -> list[State]:
        """Retained state of every device the broker knows; collects until no new one arrives for quiet_s."""
        found: dict[str, State] = {}
        last = [time.monotonic()]
        pattern = f"{protocol.PREFIX}/+/state"

        def on_state(msg) -> None:
            try:
                if protocol.parse_topic(msg.topic).kind != "state" or not msg.payload:
                    return
                state = protocol.decode(State, msg.payload)
            except ProtocolError:
                return
            found[state.device] = state
            last[0] = time.monotonic()

        self._listeners.append(on_state)
        try:
            self.subscribe(pattern)
            # retained states follow the SUBACK: the quiet period starts now, not before subscribing
            start = last[0] = time.monotonic()
            while time.monotonic() - last[0] < quiet_s and time.monotonic() - start < max_wait_s:
                time.sleep(0.05)
        finally:
            self._listeners.remove(on_state)
            self._client.unsubscribe(pattern)
        return sorted(found.values(), key=lambda s: s.device)

    def rollback(self, device: str, model: str, version: int | None = None, timeout: float = 120.0) -> Reply:
        """Make a device serve an older installed version again; raises FleetError on refusal."""
        reply = self.command(device, "rollback", protocol.RollbackRequest(model=model, version=version), timeout)
        if reply.status == "error":
            raise FleetError(f"{device} did not roll {model} back: {reply.error}")
        return reply

    def ping(self, device: str, timeout: float = 5.0) -> Reply:
        return self.command(device, "ping", protocol.PingRequest(), timeout)

    def infer(self, device: str, model: str, tensors: dict[str, np.ndarray] | None = None, timeout: float = 10.0,
              image: bytes | None = None, preprocess: str | None = None, stream: str | None = None) -> dict:
        """Run `model` on a device: on named arrays (on a stateful model's `stream`, if named),
        or on one encoded image (JPEG, PNG, ...) that the device prepares as the model's bundle
        says (or as `preprocess` says). The answer: {"model", "version", "outputs"}, and for an
        image "top1" and "class" (a classifier) or "detections" (a detector)."""
        if image is not None:
            payload = wire.pack_tensors({"image": np.frombuffer(image, np.uint8)}, v=protocol.VERSION, image=True,
                                        **({"preprocess": preprocess} if preprocess else {}))
        else:
            payload = wire.pack_tensors(tensors or {}, v=protocol.VERSION, **({"stream": stream} if stream else {}))
        corr, q = self._request(protocol.infer_topic(device, model), payload)
        try:
            header, outputs = wire.unpack_tensors(self._wait(q, timeout, f"inference on {device}/{model}"))
        finally:
            self._pending.pop(corr, None)
        if header.get("status") != "ok":
            raise FleetError(f"{device} refused the request: {header.get('error', 'no reason given')}")
        return {"model": header.get("model"), "version": header.get("version"), "outputs": outputs,
                **{k: header[k] for k in protocol.ANSWER_LABELS if k in header}}

    def deploy(self, bundle_path: str | os.PathLike, device: str, chunk_size: int = 256 * 1024,
               timeout: float = 120.0, progress: Callable[[str, int, int], None] | None = None,
               url: str | None = None, max_resends: int = 3) -> Reply:
        """Send a bundle to one device and wait until it is serving (or refused). Raises FleetError on refusal.

        The bytes go as MQTT chunks (only those the device says it is missing, so sending the
        same deploy again resumes), or, with `url`, the device downloads them itself. Chunks the
        device rejects as damaged are sent again, up to `max_resends` rounds.
        """
        path = Path(bundle_path)
        m = open_bundle(path, verify_signature=False).manifest  # the board judges the signature
        ref = protocol.BundleRef(sha256=sha256_file(path), size=path.stat().st_size)
        hint = protocol.ModelHint(name=m.name, version=m.version, runtime=m.runtime,
                                  load_mb=m.memory.load_mb, runtime_mb=m.memory.runtime_mb)
        request = protocol.DeployRequest(bundle=ref, chunk_size=chunk_size, url=url, model=hint)
        what = f"{m.name} v{m.version}"
        corr, q = self._request(protocol.cmd_topic(device, "deploy"), protocol.encode(request))
        deadline = time.monotonic() + timeout
        try:
            first = protocol.decode(Reply, self._wait(q, 10.0, f"deploy on {device}"))
            if first.status == "error":
                raise FleetError(f"{device} refused {what}: {first.error}")
            missing = list(first.data.get("missing", []))
            resends = 0
            while True:
                if missing:
                    self._send_chunks(path, device, ref.sha256, chunk_size, missing, deadline, progress)
                reply = protocol.decode(Reply, self._wait(q, max(1.0, deadline - time.monotonic()),
                                                          f"deploy on {device}"))
                if reply.final:
                    break
                missing = list(reply.data.get("missing", []))
                if missing:
                    resends += 1
                    if resends > max_resends:
                        raise FleetError(f"{device} kept rejecting chunks of {what} ({len(missing)} still missing)",
                                         "check the link to the device, then deploy again to resume")
            if reply.status == "error":
                raise FleetError(f"{device} did not take {what}: {reply.error}")
            return reply
        finally:
            self._pending.pop(corr, None)

    def _send_chunks(self, path: Path, device: str, sha256: str, chunk_size: int, indexes: list[int],
                     deadline: float, progress: Callable[[str, int, int], None] | None) -> None:
        """Publish the given chunks, each with its own sha256; pause for the broker every 16 chunks."""
        topic = protocol.upload_topic(device, sha256)
        with open(path, "rb") as f:
            for n, index in enumerate(indexes, 1):
                f.seek(index * chunk_size)
                data = f.read(chunk_size)
                header = protocol.ChunkHeader(index=index, offset=index * chunk_size,
                                              sha256=hashlib.sha256(data).hexdigest())
                info = self._client.publish(topic, wire.pack(to_dict(header), data), qos=1)
                if n % 16 == 0 or n == len(indexes):
                    info.wait_for_publish(timeout=max(1.0, deadline - time.monotonic()))
                if progress:
                    progress("upload", n, len(indexes))

    def watch(self, stop: threading.Event, kinds: tuple[str, ...] = ("state", "telemetry", "events"),
              device: str = "+") -> Iterator[tuple[str, str, dict]]:
        """Yield (device, kind, message) as they arrive until `stop` is set. Each message has been
        checked against its schema and comes as that schema's dict (defaults filled in); a message
        that does not fit is skipped, so a faulty device cannot stop the watch or a rollout."""
        q: queue.Queue = queue.Queue()
        warned: set[str] = set()

        def on_msg(msg) -> None:
            try:
                t = protocol.parse_topic(msg.topic)
                if t.kind in kinds and msg.payload:
                    report = protocol.decode(_REPORTS[t.kind], msg.payload, what=f"{t.kind} of {t.device}")
                    q.put((t.device, t.kind, to_dict(report)))
            except ProtocolError as exc:
                if msg.topic not in warned:  # once per topic: a faulty device repeats itself
                    warned.add(msg.topic)
                    log.warning("skipping messages on %s that are not valid reports: %s", msg.topic, exc)

        self._listeners.append(on_msg)
        topics = [f"{protocol.PREFIX}/{device}/{k}" for k in kinds]
        try:
            for t in topics:
                self.subscribe(t)
            while not stop.is_set():
                try:
                    yield q.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:
            self._listeners.remove(on_msg)
            for t in topics:
                self._client.unsubscribe(t)

