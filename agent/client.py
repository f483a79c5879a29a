"""A Python client for the agent's local API (agent/localapi.py): numpy in, numpy out.

    from agent.client import LocalClient
    with LocalClient() as c:                      # /run/edgeward/agent.sock by default
        out = c.infer("digits", {"input": x})     # dict of numpy arrays
        out = c.infer("kws", frame, stream="mic-0")   # stateful model: the agent keeps the state

Thread-safe: each thread gets its own connection, so concurrent callers do not queue
behind each other here (the agent batches them if the model is served batched).
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np

from . import protocol, wire
from .errors import BusyError, EdgewardError, InferenceError, ModelNotFound, ProtocolError
from .localapi import recv_message, send_message
from .tensors import from_frame, to_numpy

DEFAULT_SOCKET = os.environ.get("EDGEWARD_SOCKET", "/run/edgeward/agent.sock")
_ERRORS = {"busy": BusyError, "bad_request": InferenceError, "unknown_model": ModelNotFound,
           "bad_message": ProtocolError}


class LocalClient:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 60.0):
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()

    def _conn(self) -> socket.socket:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(self.timeout)
            try:
                conn.connect(self.path)
            except OSError as exc:
                conn.close()
                raise EdgewardError(f"cannot reach the agent at {self.path}: {exc.strerror or exc}",
                                    "is the agent running (systemctl status edgeward-agent)? "
                                    "is api.socket set to this path?") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _call(self, frame: bytes) -> tuple[dict, memoryview]:
        conn = self._conn()
        try:
            send_message(conn, frame)
            reply = recv_message(conn)
        except (OSError, ConnectionError) as exc:
            self._drop(conn)
            raise EdgewardError(f"the agent closed the connection: {exc}", "retry; check the agent's log") from exc
        if reply is None:
            self._drop(conn)
            raise EdgewardError("the agent closed the connection", "retry; check the agent's log")
        header, body = wire.unpack(reply)
        if header.get("status") != "ok":
            raise _ERRORS.get(header.get("code"), EdgewardError)(header.get("error", "agent error"))
        return header, body

    def _drop(self, conn: socket.socket) -> None:
        self._local.conn = None
        conn.close()

    def infer(self, model: str, feeds: dict | np.ndarray, stream: str | None = None) -> dict[str, np.ndarray]:
        """Run `model` on `feeds` (a dict of named arrays, or one array for a one-input model)."""
        if not isinstance(feeds, dict):
            feeds = {"input": feeds}
        extra = {"stream": stream} if stream is not None else {}
        header, body = self._call(wire.pack_tensors(feeds, v=protocol.VERSION, op="infer", model=model, **extra))
        return {t.name: to_numpy(t) for t in from_frame(header, body)}

    def reset(self, model: str, stream: str) -> bool:
        """Forget a stream's state; True if the agent had one."""
        header, _ = self._call(wire.pack({"v": protocol.VERSION, "op": "reset", "model": model, "stream": stream}))
        return bool(header.get("reset"))

    def models(self) -> list[dict]:
        header, _ = self._call(wire.pack({"v": protocol.VERSION, "op": "models"}))
        return header["models"]

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
