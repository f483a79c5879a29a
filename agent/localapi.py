"""The local API: apps on the board talk to the agent over a Unix socket, with binary tensors.

Each message, both ways, is ``uint32 big-endian length | EWF1 frame`` (agent/wire.py):
a JSON header and the raw tensor bytes, never JSON lists. Requests::

    {"v": 1, "op": "infer", "model": "kws", "stream": "mic-0", "tensors": [...]}   + tensor bytes
    {"v": 1, "op": "reset", "model": "kws", "stream": "mic-0"}
    {"v": 1, "op": "models"}
    {"v": 1, "op": "route", "model": "kws"}     -> {"socket": path or null}

``route`` names the model worker's own socket for a stateless model (agent/direct.py): the
same infer requests sent there skip a hop. Clients fall back to this socket when it is null
or gone (the model was replaced or its worker restarted). On a worker's socket a client may
attach shared-memory regions, one for large requests' tensors and one for large answers'
(agent/shm.py)::

    {"v": 1, "op": "attach", "use": "requests"|"answers", "nbytes": N} + a sealed memfd (SCM_RIGHTS)
    {"v": 1, "op": "infer", "model": "cam", "tensors": [...], "shm": true}  offsets in the request region
    {"v": 1, "op": "infer", ..., "answer_shm": true}  -> {"status": "ok", "tensors": [...], "shm": true}
                                                       when the answer fits the answer region

Answers carry ``status`` ("ok" or "error" with ``code`` and ``error``), and for inference
``model``, ``version`` and the output tensors. A connection takes one request at a time;
open several for concurrency (agent.client.LocalClient keeps one per thread). Past
``api.max_pending`` requests in flight, callers get ``busy`` at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from . import protocol, wire
from .errors import BusyError, EdgewardError, ProtocolError
from .polling import linger
from .streams import stream_id
from .tensors import encoded_image, from_frame, labels, to_frame

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
PREFIX_BYTES = _LEN.size  # each message starts with its length
MAX_MESSAGE = 256 * 1024 * 1024


def message_length(prefix, limit: int = MAX_MESSAGE) -> int:
    """The length a message's prefix announces; ProtocolError if it is over `limit`."""
    (n,) = _LEN.unpack_from(prefix)
    if n > limit:
        raise ProtocolError(f"message of {n} bytes is over the {limit}-byte limit",
                            "send fewer rows per request, or raise api.max_request_mb in the agent's config")
    return n


class HeldBytes:
    """The bytes of requests a server holds now (read, not yet answered), over all its connections.

    One request is bounded by api.max_request_mb; this bounds them together (api.max_held_mb),
    so that many callers at once cannot make the agent or a worker grow past its budget: a
    request that would cross the bound is refused with "busy" as soon as its length arrives."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.held + n > self.limit and self.held:  # one request alone always fits (max_request_mb)
                raise BusyError(f"{self.held} bytes of requests are waiting (limit {self.limit})",
                                "retry later, or raise api.max_held_mb in the agent's config")
            self.held += n

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


def recv_message(sock: socket.socket, limit: int = MAX_MESSAGE, buffer: bytearray | None = None,
                 held: HeldBytes | None = None, fds: list[int] | None = None) -> memoryview | None:
    """One length-prefixed message, or None when the peer closed the connection between messages.
    With `buffer`, a message that fits is read into it (no allocation per request); the caller
    must be done with the previous message before the next call. With `held`, the message's
    length is taken from it before its bytes are read (BusyError if they would not fit); the
    caller gives it back once the message is answered. With `fds`, descriptors sent with the
    message (agent/shm.py's attach) are added to it; the caller closes them."""
    if fds is not None:
        from .shm import recv_prefix

        head = recv_prefix(sock, _LEN.size, fds)
    else:
        head = _recv_exactly(sock, _LEN.size, eof_ok=True)
    if head is None:
        return None
    n = message_length(head, limit)
    if held is not None:
        held.take(n)
    try:
        return _recv_exactly(sock, n, into=buffer if buffer is not None and len(buffer) >= n else None)
    except BaseException:
        if held is not None:
            held.give(n)
        raise


def _recv_exactly(sock: socket.socket, n: int, eof_ok: bool = False,
                  into: bytearray | None = None) -> memoryview | None:
    buf = memoryview(into)[:n] if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:])
        if not k:
            if eof_ok and got == 0:
                return None
            raise ConnectionError("connection closed mid-message")
        got += k
    return buf


def error_frame(exc: Exception) -> bytes:
    """The answer for a failed request: its code and one line; anything not ours is an internal error."""
    if isinstance(exc, EdgewardError):
        return wire.pack({"v": protocol.VERSION, "status": "error", "code": exc.code, "error": str(exc)})
    return wire.pack({"v": protocol.VERSION, "status": "error", "code": "internal", "error": repr(exc)})


class Activity:
    """How many requests a server is handling right now, over all its connections.

    Polling for a connection's next request pays only when the server is otherwise idle:
    with many callers at once, each answered connection polling for its next request
    would take the cores (and the interpreter lock) that the model and the other
    connections need. Measured: 32 concurrent callers, 0.8 of a core spent polling."""

    def __init__(self) -> None:
        self._busy = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def idle(self) -> bool:
        return self._busy == 0


def serve_connection(conn: socket.socket, handle, spin_s: float = 0.0, buffer: bytearray | None = None,
                     stop: threading.Event | None = None, activity: Activity | None = None,
                     send: Callable[[bytes], None] | None = None, limit: int = MAX_MESSAGE,
                     held: HeldBytes | None = None, shared: bool = False) -> None:
    """Answer one connection's requests in turn until it closes (or `stop` is set).

    `handle(msg, answer)` returns the answer frame, or None when it has arranged for
    `answer(frame)` to be called later from another thread (a batched model's answers are
    sent by its batch thread: one wake-up fewer per request). A message over the size limit
    is answered, then the connection is dropped: the rest of it is unread. `buffer`, when
    given, is reused for each request (the handler keeps nothing of it). After each answer
    the connection polls for its next request for `spin_s`, if `activity` (shared by the
    server's connections) says no other request is being handled. `send`, when given, sends
    every answer instead (a batched model's outbox, agent/outbox.py: it never blocks). With
    `shared`, the client may attach shared-memory regions (agent/shm.py): `handle` is then
    called as handle(msg, answer, attachment), with the connection's agent.shm.Attachment."""
    activity = activity or Activity()
    attached = None
    if shared:
        from .shm import Attachment, close_fds

        attached = Attachment(limit, held)
    if send is None:
        sending = threading.Lock()

        def send(frame: bytes) -> None:
            with sending:
                send_message(conn, frame)

    def answer_later(frame: bytes, size: int) -> None:
        try:
            send(frame)
        except OSError:
            pass  # the caller hung up; its connection's thread sees that and closes
        finally:
            if held is not None:
                held.give(size)
            activity.leave()

    try:
        while stop is None or not stop.is_set():
            fds: list[int] | None = [] if attached else None
            try:
                msg = recv_message(conn, limit, buffer=buffer, held=held, fds=fds)
            except (ProtocolError, BusyError) as exc:  # its bytes are unread: answered, then dropped
                if fds:
                    close_fds(fds)
                send(error_frame(exc))
                return
            if msg is None:
                return
            size = len(msg)
            if fds:  # only an attach message brings a descriptor
                try:
                    send(attached.attach(msg, fds))
                finally:
                    if held is not None:
                        held.give(size)
                continue
            activity.enter()
            try:
                later = lambda frame, size=size: answer_later(frame, size)  # noqa: E731
                reply = handle(msg, later, attached) if attached else handle(msg, later)
            except BaseException:
                if held is not None:
                    held.give(size)
                activity.leave()
                raise
            if reply is None:
                continue
            try:
                send(reply)
            finally:
                if held is not None:
                    held.give(size)
                activity.leave()
            if activity.idle:
                linger(conn, spin_s)
    except (ConnectionError, OSError):
        return
    finally:
        if attached:
            attached.detach()


def send_message(sock: socket.socket, frame: bytes | list) -> None:
    """Send one message: a frame, or its parts (wire.frame_parts) gathered without copying them."""
    views = message_views(frame)
    while views:
        views = send_views(sock, views)


def message_views(frame: bytes | list) -> list[memoryview]:
    """A message's bytes as the views one sendmsg() takes: its length prefix, then the frame's parts."""
    parts = frame if isinstance(frame, list) else [frame]
    total = sum(len(p) for p in parts)
    return [memoryview(_LEN.pack(total))] + [memoryview(p).cast("B") for p in parts]


def send_views(sock: socket.socket, views: list[memoryview], flags: int = 0) -> list[memoryview]:
    """One sendmsg() of `views`; the views of what it did not take (empty once all is sent)."""
    sent = sock.sendmsg(views, [], flags)
    views = list(views)
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if views and sent:
        views[0] = views[0][sent:]
    return views


class LocalApi:
    def __init__(self, path: str, engine, mode: int = 0o660, max_pending: int = 256, spin_us: int = 0,
                 max_request_mb: int = MAX_MESSAGE >> 20, max_held_mb: int = 1 << 16):
        self.path = Path(path)
        self.limit = max_request_mb << 20
        self.held = HeldBytes(max_held_mb << 20)
        self.spin_s = spin_us / 1e6
        self._activity = Activity()
        self.engine = engine
        self.mode = mode
        self._slots = threading.BoundedSemaphore(max_pending)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and accept connections in a background thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        direct = Path(f"{self.path}.d")  # the model workers' own sockets (agent/direct.py)
        shutil.rmtree(direct, ignore_errors=True)
        direct.mkdir()
        os.chmod(direct, 0o755)  # reachable; each socket's own mode decides who may connect
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        sock.bind(str(tmp))
        os.chmod(tmp, self.mode)
        sock.listen(128)
        os.replace(tmp, self.path)  # the socket appears with its final permissions, already listening
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="local-api", daemon=True).start()
        log.info("local API listening on %s", self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="local-api-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            serve_connection(conn, self.handle, self.spin_s, stop=self._stop, activity=self._activity,
                             limit=self.limit, held=self.held)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def handle(self, msg: bytes | memoryview, _answer_later=None) -> bytes:
        """One request frame in, one answer frame out; every error becomes an answer."""
        try:
            header, body = wire.unpack(msg)
            op = header.get("op")
            if header.get("v", protocol.VERSION) != protocol.VERSION:
                raise ProtocolError(f"protocol version {header.get('v')} is not supported (this agent speaks "
                                    f"{protocol.VERSION})")
            if op == "infer":
                return self._infer(header, body)
            if op == "models":
                return wire.pack({"v": protocol.VERSION, "status": "ok", "models": self._describe()})
            if op == "route":  # where to send this model's requests: its worker directly, or here
                model = self.engine.get(str(header.get("model")))
                return wire.pack({"v": protocol.VERSION, "status": "ok", "socket": model.direct_socket,
                                  "version": model.version})
            if op == "reset":
                model = self.engine.get(str(header.get("model")))
                stream = stream_id(header.get("stream"))
                if stream is None:
                    raise ProtocolError("reset needs a stream id", "send the stream to forget as \"stream\"")
                found = model.reset_stream(stream)
                return wire.pack({"v": protocol.VERSION, "status": "ok", "reset": found})
            raise ProtocolError(f"unknown op {op!r}", "use infer, route, reset or models")
        except Exception as exc:  # a bug must not take the connection's thread down silently
            if not isinstance(exc, EdgewardError):
                log.exception("local API request failed")
            return error_frame(exc)

    def _describe(self) -> list[dict]:
        """What serves, for local apps and tools such as `edgeward bench --bare`: the tensors, and
        where the model runs (its runtime, file, threads and worker's pid)."""
        out = []
        for m in self.engine.models():
            out.append({"name": m.name, "version": m.version, "mode": m.mode,
                        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in m.request_inputs],
                        "outputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in m.reply_outputs],
                        "threads": self.engine.threads, **m.where()})
        return out

    def _infer(self, header: dict, body: memoryview) -> bytes:
        name = header.get("model")
        if not isinstance(name, str):
            raise ProtocolError("infer needs a model name")
        stream = stream_id(header.get("stream"))
        tensors = from_frame(header, body)
        image = encoded_image(tensors) if header.get("image") is True else None  # prepared in the worker
        preprocess = header.get("preprocess")
        if image is not None and not (preprocess is None or isinstance(preprocess, str)):
            raise ProtocolError("preprocess must be a string, e.g. \"imagenet\"")
        if not self._slots.acquire(blocking=False):
            raise BusyError("agent is busy: too many pending requests", "retry later")
        try:
            if image is not None:
                model, outputs = self.engine.run_image(name, image, preprocess)
                extra = labels(outputs, model.classes, model.detections)
            else:
                model, outputs = self.engine.infer(name, tensors, stream)
                extra = {}
        finally:
            self._slots.release()
        specs, out = to_frame(outputs)
        return wire.pack({"v": protocol.VERSION, "status": "ok", "model": model.name, "version": model.version,
                          **extra, "tensors": specs}, out)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.path.unlink(missing_ok=True)
        shutil.rmtree(f"{self.path}.d", ignore_errors=True)  # the workers' direct sockets


__all__ = ["LocalApi", "recv_message", "send_message"]
