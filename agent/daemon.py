"""The agent: one long-running process that owns the store, the budget, the models and the MQTT session.

Threads and why:
- paho's network thread receives messages; handlers there only parse and hand off,
  so a slow model or a large deploy never stalls keepalives;
- an inference pool runs requests (runtimes release the GIL), with a bound on
  pending requests so a flood gets "busy" answers instead of growing memory;
- one update thread takes chunks and installs bundles in order;
- the main thread publishes telemetry and feeds systemd's watchdog, so a wedged
  loop stops the pings and systemd restarts the service.

Local work never depends on the broker: models load and `Agent.infer` serves
before the first connection succeeds, and while the broker is away. Telemetry and
events produced meanwhile wait in the on-disk spool and are delivered, in order,
after the next connection (a drain thread; a graceful stop flushes it too).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import __version__, protocol, runtimes, wire
from .budget import MB, Budget
from .config import AgentConfig
from .engine import Engine
from .errors import DeployRefused, EdgewardError, IntegrityError, ProtocolError, VersionError
from .lanes import Lanes
from .link import ReplyTarget, make_client, publish_reply, reply_target
from .localapi import LocalApi
from .pipelines import Pipelines
from .protocol import Event, Hardware, Reply, State, Telemetry
from .schema import to_dict
from .signing import load_public_key
from .spool import Spool
from .status import write_status
from .streams import stream_id
from .store import Store
from .systemd import Notifier
from .tensors import encoded_image, from_frame, labels, to_frame
from .transfer import Transfer, resume_all
from .updater import Trust, Updater

log = logging.getLogger("edgeward.agent")

PENDING_PER_WORKER = 16


def _board_model() -> str:
    """The board's own name where the firmware gives one ("Raspberry Pi 4 Model B Rev 1.4")."""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(p).read_text().strip("\x00\n ")
        except OSError:
            continue
    return ""


def _temperature_c() -> float | None:
    """The hottest temperature sensor (SoC on a Pi, several zones on a Jetson), or None without sensors."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current is not None]
    return round(max(readings), 1) if readings else None


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.device = cfg.device.id
        self.max_payload = cfg.mqtt.max_payload_kb * 1024
        self.budget = Budget(cfg.memory.budget_mb, cfg.memory.reserve_mb)
        self.engine = Engine(self.budget, threads=cfg.inference.threads, emit=self.emit,
                             timeout_s=cfg.inference.timeout_s, serving_for=cfg.serving_for,
                             providers=cfg.inference.providers, evict_idle_s=cfg.memory.evict_idle_s)
        self.pipelines = Pipelines(cfg.pipelines, self.engine, self._publish_pipeline, self.max_payload)
        self.api = LocalApi(cfg.api_socket, self.engine, cfg.api.socket_mode, cfg.api.max_pending,
                            cfg.api.spin_us, cfg.api.max_request_mb, cfg.api.max_held_mb) if cfg.api_socket else None
        self.store = Store(cfg.store.path, cfg.store.keep_versions)
        trust = Trust([load_public_key(k) for k in cfg.trust.keys], cfg.trust.allow_unsigned)
        self.updater = Updater(self.store, self.engine, trust, cfg.store.max_bundle_mb * MB, self.emit)
        self.started = time.time()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._infer_pool = ThreadPoolExecutor(cfg.inference.workers, thread_name_prefix="infer")
        self._lanes = Lanes(self._infer_pool.submit)  # a stateful model's pipeline messages, in order
        self._update_pool = ThreadPoolExecutor(1, thread_name_prefix="update")
        self._pending = threading.BoundedSemaphore(cfg.inference.workers * PENDING_PER_WORKER)
        self._pending_count = 0  # for telemetry; the semaphore is what bounds
        self._pending_lock = threading.Lock()
        self._transfers: dict[str, Transfer] = resume_all(self.store.incoming)  # resumable after a restart
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # prime: the first reading is always 0
        self._client = None
        self._subscribe_mid = -1
        self._discovery_topics: set[str] = set()
        self.spool = Spool(self.store.root / "spool.sqlite", cfg.telemetry.spool_mb * MB)
        self._spool_reported_drops = 0
        self._drain_wanted = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="spool-drain", daemon=True)
        self.notifier = Notifier()
        self.last_update: dict | None = None

    # ------------------------------------------------------------ life cycle

    def start(self, install: list[str] | tuple = ()) -> None:
        """Load the store's models, install any given bundles, then connect in the background.

        A bundle in `install` whose version is already installed is skipped, so a unit or
        script can pass the same --install on every start; any other problem is raised.
        """
        if self.api is not None:  # first, so the models loaded next get their direct sockets
            try:
                self.api.start()
                self.engine.direct_dir = f"{self.cfg.api_socket}.d"
                self.engine.direct_mode = self.cfg.api.socket_mode
                self.engine.direct_spin_us = self.cfg.api.spin_us
                self.engine.direct_max_message = self.cfg.api.max_request_mb << 20
                self.engine.direct_max_held = self.cfg.api.max_held_mb << 20
            except OSError as exc:
                log.error("local API unavailable: cannot create %s (%s); set api.socket to a writable path "
                          "(or \"off\")", self.cfg.api_socket, exc.strerror or exc)
                self.api = None
        self.updater.load_current()
        for path in install:
            try:
                self.updater.install(path)
            except VersionError as exc:
                log.info("not installing %s: %s", path, exc.message)
        will = (protocol.state_topic(self.device), protocol.encode(State(device=self.device, online=False)))
        client = make_client(f"edgeward-agent-{self.device}", self.cfg.mqtt, will=will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        # set before the network thread starts: it may connect and publish the birth message at once
        self._client = client
        self._drainer.start()
        client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive_s)
        client.loop_start()
        self.write_status()
        self.notifier.ready(self.summary())
        log.info("agent %s started: %d model(s) serving, budget %d MB, broker %s",
                 self.device, len(self.engine.models()), self.cfg.memory.budget_mb, self.cfg.mqtt.url)

    def run(self) -> None:
        """The main loop: telemetry and status at their interval, the watchdog fed, until stop()."""
        interval = self.cfg.telemetry.interval_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_at:
                try:
                    self.tick()
                except Exception:  # a failed reading must not stop the agent serving
                    log.exception("periodic telemetry/status failed; trying again next interval")
                next_at = time.monotonic() + interval
            self.notifier.feed_watchdog()
            wait = next_at - time.monotonic()
            if self.notifier.watchdog_interval_s:
                wait = min(wait, self.notifier.watchdog_interval_s / 2)
            self._stop.wait(min(1.0, max(0.05, wait)))

    def tick(self) -> None:
        """Periodic work: telemetry to the broker, the local status file, systemd's STATUS line,
        from one reading of the memory (reading PSS walks each process's mappings)."""
        memory = self.budget.measure()
        self.publish_telemetry(memory)
        self.write_status(memory=memory)
        self.notifier.status(self.summary(memory))

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Drain gracefully: take no new work, finish what is in flight, publish the offline state.

        Requests already accepted complete and get their answers; an install in progress
        finishes (queued chunks and deploys are dropped: the fleet can resume them).
        """
        self._stop.set()
        self.notifier.stopping("draining: finishing in-flight requests")
        client = self._client
        if client is not None and self.connected.is_set():
            client.unsubscribe(protocol.device_subscriptions(self.device))
        if self.api is not None:
            self.api.stop()
        self._infer_pool.shutdown(wait=True)
        self._update_pool.shutdown(wait=True, cancel_futures=True)
        for transfer in list(self._transfers.values()):
            transfer.save()  # what arrived so far is kept for a deploy sent again after the restart
        if self._drainer.is_alive():
            self._drainer.join(5)
        if client is not None:
            if self.connected.is_set():
                self._drain_spool()
                info = client.publish(protocol.state_topic(self.device),
                                      protocol.encode(self.state(online=False)), qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=3)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
            client.loop_stop()
        self.write_status(running=False)
        self.spool.close()
        self.engine.close()
        log.info("agent %s stopped", self.device)

    # ------------------------------------------------------------ local API

    def infer(self, model: str, feeds: dict) -> dict:
        """In-process inference with numpy arrays; works with or without a broker."""
        return self.engine.infer_arrays(model, feeds)[1]

    # ------------------------------------------------------------ what the agent tells the world

    def state(self, online: bool = True) -> State:
        vm = psutil.virtual_memory()
        return State(
            device=self.device, online=online, agent_version=__version__, groups=list(self.cfg.device.groups),
            hardware=Hardware(machine=platform.machine(), model=_board_model(), cpu_count=os.cpu_count() or 0,
                              ram_mb=int(vm.total / MB), os=platform.platform(terse=True),
                              python=platform.python_version()),
            runtimes=runtimes.available(), budget_mb=self.cfg.memory.budget_mb,
            models=[m.info() for m in self.engine.models()] + self.engine.evicted_infos(),
            runtime_versions=runtimes.versions(),
        )

    def telemetry(self, memory: tuple[float, float] | None = None) -> Telemetry:
        """`memory`: (RSS sum, PSS) as Budget.measure() gives it, read now if not given."""
        spool = self.spool.stats()
        rss, used = memory or self.budget.measure()
        return Telemetry(
            device=self.device, uptime_s=round(time.time() - self.started, 1),
            rss_mb=round(rss, 1), memory_mb=round(used, 1),
            cpu_percent=self._proc.cpu_percent(None),
            available_mb=round(self.budget.available_mb(), 1), budget_mb=self.cfg.memory.budget_mb,
            load_1m=round(os.getloadavg()[0], 2), temperature_c=_temperature_c(),
            disk_free_mb=round(shutil.disk_usage(self.store.root).free / MB, 1),
            pending_requests=self._pending_count,
            models={m.name: m.snapshot() for m in self.engine.models()},
            spool_queued=spool.queued, spool_dropped=spool.dropped_telemetry + spool.dropped_events,
        )

    def _publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 spool_kind: str | None = None) -> None:
        """Publish now if we can. Telemetry and events (`spool_kind`) that cannot go now, or would
        overtake older spooled ones, go to the spool instead of being lost."""
        client = self._client
        if spool_kind is not None and (not self.connected.is_set() or len(self.spool)):
            self.spool.append(spool_kind, topic, payload)
            self._drain_wanted.set()
            return
        if client is None or not self.connected.is_set():
            return
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if spool_kind is not None and info.rc != 0:  # the link dropped under us
            self.spool.append(spool_kind, topic, payload)

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._drain_wanted.wait(1.0)
            self._drain_wanted.clear()
            if self.connected.is_set() and not self._stop.is_set():
                try:
                    self._drain_spool()
                except Exception:
                    log.exception("delivering the spool failed; it will be retried")

    def _drain_spool(self, batch: int = 64, timeout: float = 10.0) -> None:
        """Deliver spooled messages oldest first, QoS 1; forget each only once the broker acknowledged it."""
        client = self._client
        while client is not None and self.connected.is_set():
            rows = self.spool.peek(batch)
            if not rows:
                break
            sent = [(row_id, client.publish(topic, payload, qos=1)) for row_id, topic, payload, _ in rows]
            acked = []
            for row_id, info in sent:
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    break
                if not info.is_published():
                    break
                acked.append(row_id)
            self.spool.remove(acked)
            if len(acked) < len(rows):
                return
        stats = self.spool.stats()
        dropped = stats.dropped_telemetry + stats.dropped_events
        if dropped > self._spool_reported_drops:
            self._spool_reported_drops = dropped
            self.emit("spool_dropped", f"the spool was full while offline: {stats.dropped_telemetry} telemetry and "
                      f"{stats.dropped_events} event messages were dropped in all (raise telemetry.spool_mb to keep more)",
                      level="warning", data={"dropped_telemetry": stats.dropped_telemetry,
                                             "dropped_events": stats.dropped_events})

    def publish_state(self) -> None:
        state = self.state()
        self._publish(protocol.state_topic(self.device), protocol.encode(state), qos=1, retain=True)
        if self.cfg.homeassistant.enabled:
            self._publish_discovery(state)

    def _publish_discovery(self, state: State) -> None:
        """Home Assistant discovery configs (retained); a model no longer served gets its entities removed."""
        from .homeassistant import discovery_messages

        messages = discovery_messages(state, self.cfg.homeassistant.prefix, self.cfg.pipelines)
        for topic in self._discovery_topics - set(messages):
            self._publish(topic, b"", qos=1, retain=True)
        for topic, payload in messages.items():
            self._publish(topic, payload, qos=1, retain=True)
        self._discovery_topics = set(messages)

    def publish_telemetry(self, memory: tuple[float, float] | None = None) -> None:
        self._publish(protocol.telemetry_topic(self.device), protocol.encode(self.telemetry(memory)),
                      spool_kind="telemetry")

    def summary(self, memory: tuple[float, float] | None = None) -> str:
        """One line for systemd's STATUS=: what serves, the broker link, memory."""
        models = ", ".join(f"{m.name} v{m.version}" for m in self.engine.models()) or "no model"
        link = "broker connected" if self.connected.is_set() else "broker not connected"
        used = memory[1] if memory else self.budget.used_mb()
        return f"serving {models}; {link}; memory {used:.0f}/{self.cfg.memory.budget_mb} MB"

    def write_status(self, running: bool = True, memory: tuple[float, float] | None = None) -> None:
        """The local status file read by `edgeward agent status`."""
        stats = {m.name: m.snapshot() for m in self.engine.models()}
        rss, used = memory or self.budget.measure()
        status = {
            "device": self.device, "pid": os.getpid(), "running": running, "ts": time.time(),
            "started": self.started, "agent_version": __version__,
            "broker": {"url": self.cfg.mqtt.url, "connected": self.connected.is_set()},
            "memory": {"rss_mb": round(rss, 1), "used_mb": round(used, 1),
                       "budget_mb": self.cfg.memory.budget_mb,
                       "available_mb": round(self.budget.available_mb(), 1)},
            "models": [{**to_dict(m.info()), "requests": stats[m.name].requests, "errors": stats[m.name].errors,
                        "p50_ms": stats[m.name].p50_ms, "streams": stats[m.name].streams}
                       for m in self.engine.models()],
            "last_update": self.last_update,
        }
        try:
            write_status(self.store.root, status)
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)

    def emit(self, kind: str, message: str, level: str = "info", model: str | None = None,
             version: int | None = None, data: dict | None = None) -> None:
        """An event: logged on the board and published (QoS 1) for the fleet."""
        log.log(logging.getLevelName(level.upper()), "%s: %s", kind, message)
        event = Event(device=self.device, kind=kind, message=message, level=level, model=model,
                      version=version, data=data or {})
        self._publish(protocol.events_topic(self.device), protocol.encode(event), qos=1, spool_kind="event")

    # ------------------------------------------------------------ MQTT callbacks (paho's thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        # retainAsPublished: a retained command published while we are subscribed would otherwise reach
        # us with retain=0 (MQTT clears the flag for existing subscribers) and be acted upon
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        topics = [(t, options) for t in protocol.device_subscriptions(self.device)]
        topics += [(t, SubscribeOptions(qos=q)) for t, q in self.pipelines.subscriptions()]
        _, self._subscribe_mid = client.subscribe(topics)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """Only once the broker has acknowledged our subscriptions do we announce ourselves:
        a fleet that sees the birth message can send commands and they will arrive."""
        if mid != self._subscribe_mid:
            return
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker refused our subscriptions (%s): check the ACL for device %s", ", ".join(failed), self.device)
        self.connected.set()
        self.publish_state()
        self._drain_wanted.set()
        log.info("connected to %s", self.cfg.mqtt.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        """Route a message; nothing received may raise out of here (paho would stop its loop)."""
        try:
            self._route(msg)
        except Exception:  # a bug must not take the session down
            log.exception("unexpected error handling a message on %s", msg.topic)

    def _route(self, msg) -> None:
        pipes = self.pipelines.match(msg.topic) if self.pipelines.configs else []
        if pipes:
            for pipe in pipes:
                self._submit_pipeline(pipe, msg.payload, msg.topic)
            return
        try:
            topic = protocol.parse_topic(msg.topic)
        except ProtocolError as exc:
            log.warning("ignoring message: %s", exc)
            return
        if msg.retain:
            # A retained command would re-run on every reconnect: never act on one.
            log.warning("ignoring retained message on %s (commands must not be retained)", msg.topic)
            return
        if topic.kind == "infer":
            self._submit_infer(topic.arg, msg)
        elif topic.kind == "cmd":
            self._handle_command(topic.arg, msg)
        elif topic.kind == "upload":
            self._update_pool.submit(self._guard, self._handle_chunk, topic.arg, msg.payload)

    def _reply(self, target: ReplyTarget | None, reply: Reply) -> None:
        if target is None:
            return
        if target.legacy:
            reply.corr = target.corr_text
        publish_reply(self._client, target, protocol.encode(reply))

    @staticmethod
    def _guard(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))

    # ------------------------------------------------------------ commands

    def _handle_command(self, verb: str, msg) -> None:
        target = reply_target(msg)
        cls = protocol.COMMANDS.get(verb)
        if cls is None:
            self._reply(target, Reply(status="error", code="unknown_command",
                                      error=f"unknown command {verb!r}; known: {', '.join(protocol.COMMANDS)}"))
            return
        try:
            request = protocol.decode(cls, msg.payload, self.max_payload, what=f"{verb} request")
        except ProtocolError as exc:
            self._reply(target, protocol.error_reply(exc))
            return
        target = target or reply_target(msg, {"reply_to": request.reply_to, "corr": request.corr})
        if verb == "ping":
            self._reply(target, Reply(status="ok", data=to_dict(self.state())))
        elif verb == "deploy":
            self._update_pool.submit(self._guard, self._start_deploy, request, target)
        elif verb == "rollback":
            self._update_pool.submit(self._guard, self._rollback, request, target)

    def _start_deploy(self, request: protocol.DeployRequest, target: ReplyTarget | None) -> None:
        ref = request.bundle
        try:
            self._check_deploy(request)
        except EdgewardError as exc:
            self.emit("deploy_refused", exc.message, level="error",
                      data={"sha256": ref.sha256, "code": exc.code})
            self._reply(target, protocol.error_reply(exc))
            return
        transfer = self._transfers.get(ref.sha256)
        if transfer is not None and (transfer.size != ref.size or transfer.chunk_size != request.chunk_size):
            transfer.discard()
            transfer = None
        if transfer is None:
            transfer = Transfer(ref.sha256, ref.size, request.chunk_size, self.store.incoming / f"{ref.sha256}.part")
            transfer.open()
            self._transfers[ref.sha256] = transfer
        transfer.reply_to, transfer.correlation = (target.topic, target.correlation) if target else (None, None)
        source = request.url or "mqtt"
        self.emit("deploy_receiving", f"receiving bundle {ref.sha256[:12]}… ({ref.size} bytes) from {source}",
                  data={"sha256": ref.sha256, "missing": len(transfer.missing()), "source": source})
        self._reply(target, Reply(status="progress", data={
            "state": "downloading" if request.url else "receiving", "n_chunks": transfer.n_chunks,
            "missing": [] if request.url else transfer.missing()}))
        if request.url and not transfer.complete:
            try:
                transfer.download(request.url, self._stop.is_set, cafile=self.cfg.store.download_ca_file,
                                  progress=self._download_progress(transfer))
            except EdgewardError as exc:
                if isinstance(exc, IntegrityError):  # (before the answer, as below)
                    self._transfers.pop(ref.sha256, None)
                    transfer.discard()
                self._deploy_failed(exc, ref.sha256, target)
                return
        if transfer.complete:
            self._finish_deploy(transfer, target)

    def _check_deploy(self, request: protocol.DeployRequest) -> None:
        """Refuse before any byte moves what would be refused after: size, disk, version, budget."""
        ref = request.bundle
        if ref.size > self.cfg.store.max_bundle_mb * MB:
            raise DeployRefused(f"bundle is {ref.size / MB:.1f} MB, over this device's "
                                f"{self.cfg.store.max_bundle_mb} MB cap", "raise store.max_bundle_mb on the device")
        if not request.url and request.chunk_size + 4096 > self.max_payload:
            raise DeployRefused(f"chunk size {request.chunk_size} does not fit this device's {self.max_payload}-byte "
                                "message limit", f"deploy with chunks of at most {(self.max_payload - 4096) // 1024} kB")
        have = self._transfers.get(ref.sha256)
        already = have.size if have is not None and have.size == ref.size else 0
        free = shutil.disk_usage(self.store.root).free + already
        if free < 2 * ref.size:
            raise DeployRefused(f"the store has {free / MB:.1f} MB free, the bundle needs {2 * ref.size / MB:.1f} MB "
                                "(download plus unpacked copy)", "free disk space on the device")
        hint = request.model
        if hint is not None:
            cur = self.store.current(hint.name)
            if cur is not None and hint.version <= cur[0]:
                raise VersionError(f"{hint.name} version {hint.version} is not newer than the installed version "
                                   f"{cur[0]}", "build the bundle with a higher --version, or use rollback")
            have = runtimes.available()
            if hint.runtime and hint.runtime not in have:
                raise DeployRefused(f"{hint.name} v{hint.version} needs the {hint.runtime} runtime, which this device "
                                    f"does not have (it has: {', '.join(have) or 'none'})",
                                    "install it on the device (pip install 'edgeward[device]'), or deploy the "
                                    "bundle of the other format (edgeward convert --format both makes both)")
            self.engine.admit_declared(hint.name, hint.runtime, hint.load_mb, hint.runtime_mb)

    def _download_progress(self, transfer: Transfer):
        """An event at every tenth of a download, so the fleet sees it move."""
        last = [-1]

        def report(done: int, total: int) -> None:
            tenth = done * 10 // total
            if tenth != last[0]:
                last[0] = tenth
                self.emit("deploy_downloading", f"bundle {transfer.sha256[:12]}…: {done}/{total} chunks",
                          data={"sha256": transfer.sha256, "done": done, "total": total})
        return report

    def _deploy_failed(self, exc: Exception, sha256: str, target: ReplyTarget | None) -> None:
        """A deploy that will not serve: an event, the local record and the error reply."""
        if not isinstance(exc, EdgewardError):
            log.exception("deploy failed unexpectedly")
        self.emit("deploy_failed", str(exc) if isinstance(exc, EdgewardError) else f"internal error: {exc!r}",
                  level="error", data={"sha256": sha256, "code": getattr(exc, "code", "internal")})
        self._record_update(error=exc, sha256=sha256)
        self._reply(target, protocol.error_reply(exc))

    def _rollback(self, request: protocol.RollbackRequest, target: ReplyTarget | None) -> None:
        try:
            result = self.updater.rollback(request.model, request.version)
        except Exception as exc:
            if not isinstance(exc, EdgewardError):
                log.exception("rollback failed unexpectedly")
            self.emit("rollback_failed", str(exc), level="error", model=request.model,
                      data={"code": getattr(exc, "code", "internal")})
            self._reply(target, protocol.error_reply(exc))
            return
        self._record_update(result=result)
        self._reply(target, Reply(status="ok", data=result))

    def _record_update(self, result: dict | None = None, error: BaseException | None = None,
                       sha256: str | None = None) -> None:
        """Remember the last deploy or rollback for `agent status`; after a switch, tell the fleet and systemd."""
        self.last_update = {"ts": time.time(), "ok": error is None, "error": str(error) if error else None,
                            "sha256": sha256, "model": result["name"] if result else None,
                            "version": result["version"] if result else None}
        if error is None:
            self.publish_state()
            self.notifier.status(self.summary())
        self.write_status()

    def _handle_chunk(self, sha256: str, payload: bytes) -> None:
        transfer = self._transfers.get(sha256)
        if transfer is None:
            log.warning("chunk for %s… arrived without a deploy request; dropped", sha256[:12])
            return
        target = ReplyTarget(transfer.reply_to, transfer.correlation) if transfer.reply_to else None
        try:
            header, body = wire.unpack(payload, self.max_payload)
            chunk = protocol.from_fields(protocol.ChunkHeader, header, "chunk header")
            transfer.add(chunk.index, chunk.offset, bytes(body), chunk.sha256)
        except ProtocolError as exc:
            self.emit("deploy_bad_chunk", str(exc), level="warning", data={"sha256": sha256})
            return
        except IntegrityError as exc:  # damaged in transit: ask for it again, the sender is waiting for a reply
            self.emit("deploy_bad_chunk", str(exc), level="warning", data={"sha256": sha256, "index": chunk.index})
            self._reply(target, Reply(status="progress", data={"state": "receiving", "n_chunks": transfer.n_chunks,
                                                               "missing": [chunk.index]}))
            return
        if transfer.complete:
            self._finish_deploy(transfer, target)

    def _finish_deploy(self, transfer: Transfer, target: ReplyTarget | None) -> None:
        self._transfers.pop(transfer.sha256, None)
        try:
            try:
                path = transfer.finish()
                self.emit("deploy_received", f"bundle {transfer.sha256[:12]}… received and its sha256 verified",
                          data={"sha256": transfer.sha256})
                result = self.updater.install(path)
            finally:  # before any answer: a sender told "refused" finds nothing of it left on the board
                transfer.discard()
        except Exception as exc:
            self._deploy_failed(exc, transfer.sha256, target)
            return
        self._record_update(result=result, sha256=transfer.sha256)
        self._reply(target, Reply(status="ok", data=result))

    # ------------------------------------------------------------ inference over MQTT

    def _submit_infer(self, model: str, msg) -> None:
        target = reply_target(msg)
        self._submit_bounded(lambda: self._run_infer(model, msg, target), lambda: self._infer_reply(
            target, {"status": "error", "code": "busy", "error": "agent is busy: too many pending requests; retry later"}),
                             lane=model if self.engine.keeps_streams(model) else None)

    def _submit_pipeline(self, pipe, payload: bytes, topic: str) -> None:
        """Like an inference request, but from a pipeline's input topic. A stateful model's
        messages run one at a time in arrival order (agent/lanes.py): they carry its streams."""
        self._submit_bounded(lambda: self.pipelines.handle(pipe, payload, topic), lambda: self._publish_pipeline(
            pipe.output_topic, json.dumps({"v": protocol.VERSION, "status": "error", "code": "busy",
                                           "error": "agent is busy: too many pending requests; message dropped"}
                                          ).encode(), pipe.qos),
                             lane=pipe.model if self.engine.keeps_streams(pipe.model) else None)

    def _submit_bounded(self, work, busy, lane: str | None = None) -> None:
        """Run `work` in the inference pool if a pending slot is free, else call `busy` at once:
        paho's thread never blocks and a flood never grows memory. Work in one `lane` runs in
        the order it came."""
        if not self._pending.acquire(blocking=False):
            busy()
            return
        self._count_pending(+1)

        def run() -> None:
            try:
                work()
            finally:
                self._count_pending(-1)
                self._pending.release()

        try:
            self._lanes.run(lane, run)
        except RuntimeError:  # pool shut down: the agent is stopping
            self._count_pending(-1)
            self._pending.release()

    def _publish_pipeline(self, topic: str, payload: bytes, qos: int) -> None:
        client = self._client
        if client is not None:
            client.publish(topic, payload, qos=qos)

    def _count_pending(self, delta: int) -> None:
        with self._pending_lock:
            self._pending_count += delta

    def _run_infer(self, model_name: str, msg, target: ReplyTarget | None) -> None:
        header = {}
        try:
            header, body = wire.unpack(msg.payload, self.max_payload)
            tensors = from_frame(header, body)
            request = protocol.from_fields(protocol.InferHeader, header, "inference request")
            target = target or reply_target(msg, header)
            extra = {"corr": target.corr_text} if target is not None and target.legacy else {}
            if request.image:  # an encoded image, decoded in the model's worker
                model, outputs = self.engine.run_image(model_name, encoded_image(tensors), request.preprocess)
                extra.update(labels(outputs, model.classes, model.detections))
            else:
                model, outputs = self.engine.infer(model_name, tensors, stream_id(request.stream))
            specs, out = to_frame(outputs)
            payload = wire.pack({"v": protocol.VERSION, "status": "ok", "model": model.name,
                                 "version": model.version, **extra, "tensors": specs}, out)
        except EdgewardError as exc:
            payload = None
            self._infer_reply(target or reply_target(msg, header),
                              {"status": "error", "code": exc.code, "error": str(exc)})
        except Exception as exc:
            log.exception("inference on %s failed unexpectedly", model_name)
            payload = None
            self._infer_reply(target, {"status": "error", "code": "internal", "error": repr(exc)})
        if payload is not None and target is not None:
            publish_reply(self._client, target, payload)

    def _infer_reply(self, target: ReplyTarget | None, header: dict) -> None:
        if target is None:
            return
        header = {"v": protocol.VERSION, **header}
        if target.legacy:
            header["corr"] = target.corr_text
        publish_reply(self._client, target, wire.pack(header))
