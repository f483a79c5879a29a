"""Direct connections from local apps to a model's worker: one hop instead of two.

For a stateless model, the worker also listens on its own Unix socket (the agent hands
its path to clients with the local API's ``route`` op). A request then goes app → worker
→ app, the same frames as the agent's socket, with the same checks (names, dtypes,
shapes, finite values) and the same error answers. A batched model batches these
requests in the worker (agent/batcher.py), next to the runtime. Stateful models are not
served here: a stream's calls must meet in the agent.

The worker counts these requests itself; the agent adds them to the model's telemetry.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from . import protocol, wire
from .errors import BusyError, EdgewardError, ProtocolError
from .localapi import error_frame, send_message, serve_connection
from .stats import Stats
from .tensors import Tensor, check_inputs, from_frame, to_frame

log = logging.getLogger(__name__)


class DirectServer:
    def __init__(self, path: str, mode: int, model: str, version: int, specs: list,
                 run: Callable[[list[Tensor]], list[Tensor]], max_conns: int = 64, spin_us: int = 0,
                 max_rows: int | None = None):
        self.path, self.model, self.version, self.specs = Path(path), model, version, specs
        self.max_rows = max_rows  # a batching worker with a fixed batch size takes 1..max_rows rows
        self.spin_s = spin_us / 1e6
        self._run = run
        self.stats = Stats()
        self._slots = threading.BoundedSemaphore(max_conns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, mode)
        self._sock.listen(128)
        threading.Thread(target=self._accept, name="direct-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                send_message(conn, error_frame(BusyError("too many connections to this model", "retry later")))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="direct-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:  # a buffer reused for every request that fits: handle() keeps nothing of it
            serve_connection(conn, self.handle, self.spin_s, buffer=bytearray(1 << 20))
        finally:
            conn.close()
            self._slots.release()

    def handle(self, msg) -> bytes:
        t0 = time.perf_counter()
        try:
            header, body = wire.unpack(msg)
            if header.get("op") != "infer" or header.get("model") != self.model:
                raise ProtocolError(f"this socket serves only inference on {self.model!r}",
                                    "send other requests to the agent's socket")
            if header.get("stream") is not None:
                raise ProtocolError(f"model {self.model!r} keeps no stream state", "leave out the stream id")
            feeds = check_inputs(self.model, self.specs, from_frame(header, body), max_rows=self.max_rows)
            out = self._run(feeds)
        except Exception as exc:  # a bug must become an answer, not a dead connection
            if not isinstance(exc, EdgewardError):
                log.exception("direct request failed")
            self.stats.record(None, ok=False)
            return error_frame(exc)
        specs, data = to_frame(out)
        reply = wire.pack({"v": protocol.VERSION, "status": "ok", "model": self.model, "version": self.version,
                           "tensors": specs}, data)
        self.stats.record((time.perf_counter() - t0) * 1000, ok=True)
        return reply

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
