"""Direct connections from local apps to a model's worker: one hop instead of two.

The worker also listens on its own Unix socket (the agent hands its path to clients with
the local API's ``route`` op). A request then goes app → worker → app, the same frames as
the agent's socket, with the same checks (names, dtypes, shapes, finite values) and the
same error answers. A batched model batches these requests in the worker
(agent/batcher.py), next to the runtime. A stateful model's streams live in the worker
(agent/streams.py), so a stream's calls meet there whichever socket they come through.

The worker counts these requests itself; the agent adds them to the model's telemetry.

A streaming model gives each connection a thread: the request runs in it, at once. A
batched model with small requests has all its connections read by one thread that waits
on them together (selectors): its requests only queue for a batch, and 32 threads waking
one by one, each handing the interpreter lock on, cost more than the reading itself
(digits CNN, 32 clients: 13,000 -> 19,500 rows/s). Requests of more than READER_MAX_ROW_BYTES
a row (images) keep a thread per connection: there the reading is the work, and one
thread doing all of it was 9 % slower (MobileNet-style CNN, 196 kB a request).
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from . import protocol, shm, wire
from .errors import BusyError, CallerGone, EdgewardError, ProtocolError
from .localapi import (MAX_MESSAGE, PREFIX_BYTES, Activity, HeldBytes, error_frame, message_length,
                       send_message, serve_connection)
from .outbox import Drain, Outbox
from .stats import Stats
from .streams import no_stream_state, stream_id
from .tensors import ITEMSIZE, Tensor, check_inputs, to_frame

log = logging.getLogger(__name__)

READER_MAX_ROW_BYTES = 64 * 1024  # a batched model's rows up to this size: one reader thread
READ_BYTES = 64 * 1024  # what the reader takes from a connection at a time; larger messages get their own bytes
PLANS = 64  # distinct request headers (and answer shapes) whose parsing and checks are kept


def row_bytes(specs: list) -> int | None:
    """Bytes of one row of all inputs together; None if a non-batch axis is dynamic."""
    total = 0
    for spec in specs:
        dims = list(spec.shape[1:])
        if any(d is None or d < 0 for d in dims):
            return None
        if spec.dtype not in ITEMSIZE:
            return None
        total += math.prod(dims) * ITEMSIZE[spec.dtype]
    return total


class DirectServer:
    def __init__(self, path: str, mode: int, model: str, version: int, specs: list,
                 run: Callable[[list[Tensor]], list[Tensor]], max_conns: int = 64, spin_us: int = 0,
                 max_rows: int | None = None, submit: Callable | None = None, reader: bool | None = None,
                 max_message: int = MAX_MESSAGE, max_held: int = 1 << 36,
                 run_stream: Callable[[list[Tensor], str | None], list[Tensor]] | None = None,
                 cancel: Callable[[object], int] | None = None):
        self.path, self.model, self.version, self.specs = Path(path), model, version, specs
        self.max_rows = max_rows  # a batching worker with a fixed batch size takes 1..max_rows rows
        self.max_message = max_message  # api.max_request_mb: bytes one request may make this worker hold
        self.held = HeldBytes(max_held)  # api.max_held_mb: what all requests may hold together
        self.spin_s = spin_us / 1e6
        self._activity = Activity()
        self._run = run
        self._run_stream = run_stream  # a stateful model: (inputs, stream id) -> outputs
        self._submit = submit  # a batcher's submit_async: its batch thread sends the answers
        self._cancel = cancel  # the batcher's cancel: a closed connection's queued requests go with it
        self._drain = Drain() if submit is not None else None  # what a batch thread could not send at once
        self.stats = Stats()
        self._frames = wire.TensorFrames(PLANS)  # each request header's parse and checks, done once
        self._answer_heads: dict[tuple, bytes] = {}  # output shapes -> answer frame up to its body
        self._slots = threading.BoundedSemaphore(max_conns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, mode)
        self._sock.listen(128)
        self._closed = False
        if reader is None:  # see the module's docstring
            size = row_bytes(specs)
            reader = size is not None and size <= READER_MAX_ROW_BYTES
        self._reader = bool(reader) and submit is not None  # a streaming model runs in its connection's thread
        if not self._reader:
            threading.Thread(target=self._accept, name="direct-accept", daemon=True).start()
        else:
            self._max_conns = max_conns
            self._wake_r, self._wake_w = socket.socketpair()
            threading.Thread(target=self._read_all, name="direct-reader", daemon=True).start()

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
        # a buffer reused for every request that fits, when each is answered before the next
        # is read; a batched request's bytes wait in the batcher's queue, so they get their own
        buffer = None if self._submit else bytearray(1 << 20)
        box = Outbox(conn, self._drain) if self._submit else None

        def handle(msg, answer_later=None, shared=None):
            return self.handle(msg, answer_later, shared, owner=box)

        try:
            serve_connection(conn, handle, self.spin_s, buffer=buffer, activity=self._activity,
                             send=box.send if box else None, limit=self.max_message, held=self.held,
                             shared=True)
        finally:
            self._forget(box)
            (box or conn).close()
            self._slots.release()

    def _read_all(self) -> None:
        """The batched model's one reading thread: accept, read whatever arrived on any
        connection, cut it into messages and queue each for a batch."""
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        conns: set[_Conn] = set()
        try:
            while not self._closed:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    if key.data is None:
                        self._accept_one(sel, conns)
                        continue
                    try:
                        keep = self._read_from(key.data)
                    except Exception:  # a bug on one connection's bytes must not stop the others'
                        log.exception("reading a request failed; closing its connection")
                        keep = False
                    if not keep:
                        sel.unregister(key.fileobj)
                        conns.discard(key.data)
                        self.held.give(key.data.held)  # a message it did not finish sending
                        self._forget(key.data)
                        key.data.close()
        finally:
            for c in conns:
                c.close()
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _forget(self, conn: object) -> None:
        """A connection has ended: its requests still queued for a batch leave the queue now,
        so that the callers still here are not refused as busy behind rows nobody waits for."""
        if self._cancel is not None and conn is not None:
            rows = self._cancel(conn)
            if rows:
                log.info("a caller of %r left with %d rows queued; they were dropped", self.model, rows)

    def _accept_one(self, sel: selectors.BaseSelector, conns: set) -> None:
        try:
            sock, _ = self._sock.accept()
        except OSError:
            return
        if len(conns) >= self._max_conns:
            try:
                send_message(sock, error_frame(BusyError("too many connections to this model", "retry later")))
            except OSError:
                pass
            sock.close()
            return
        c = _Conn(sock, self._drain)
        conns.add(c)
        sel.register(sock, selectors.EVENT_READ, c)

    def _read_from(self, c: "_Conn") -> bool:
        """Take what one connection sent; False once it is to be closed. Small messages are cut
        from a shared buffer; a large one (an image) is read straight into bytes of its own."""
        try:
            if c.msg is not None:
                k = c.sock.recv_into(memoryview(c.msg)[c.got:])  # readable: these return at once
                if not k:
                    return False
                c.got += k
                if c.got == len(c.msg):
                    msg, c.msg, c.held = c.msg, None, 0
                    self._dispatch(c, memoryview(msg))
                return True
            data = c.sock.recv(READ_BYTES)
        except OSError:
            return False
        if not data:
            return False
        c.buf += data
        while len(c.buf) >= PREFIX_BYTES:
            try:
                n = message_length(c.buf, self.max_message)
                if not c.held:
                    self.held.take(n)
                    c.held = n
            except (ProtocolError, BusyError) as exc:  # answered, then dropped: the rest of it is unread
                c.send(error_frame(exc))
                return False
            have = len(c.buf) - PREFIX_BYTES
            if have < n:
                if n > READ_BYTES:  # the rest goes straight into the message's own bytes
                    c.msg = bytearray(n)
                    c.msg[:have] = c.buf[PREFIX_BYTES:]
                    c.got = have
                    c.buf.clear()
                break
            msg = bytes(c.buf[PREFIX_BYTES:PREFIX_BYTES + n])  # its own bytes: it waits in the batcher's queue
            del c.buf[:PREFIX_BYTES + n]
            c.held = 0
            self._dispatch(c, memoryview(msg))
        return True

    def _dispatch(self, c: "_Conn", msg: memoryview) -> None:
        """Hand one whole message on; its bytes count as held (self.held) until it is answered."""
        size = len(msg)

        def answer(frame: bytes) -> None:
            try:
                c.send(frame)
            finally:
                self.held.give(size)

        reply = self.handle(msg, answer, owner=c)
        if reply is not None:
            answer(reply)

    def handle(self, msg, answer_later: Callable[[bytes], None] | None = None, shared=None,
               owner: object = None) -> bytes | None:
        """The answer frame, or None when a batcher will send it through `answer_later`. `shared`
        is the connection's agent.shm.Attachment: with "shm" in its header a request's tensors
        are in its request region, and with "answer_shm" the answer goes to its answer region
        when it fits there. `owner` is the connection, for the batcher's cancel."""
        t0 = time.perf_counter()
        answers = None
        try:
            header, body, key = self._frames.unpack(msg)
            if header.get("op") == "attach":  # with its descriptor it never gets here (localapi.serve_connection)
                if shared is None:
                    raise ProtocolError("this socket takes no shared memory", "send the tensors inline")
                raise ProtocolError("attach brought no file descriptor",
                                    "send the memfd as SCM_RIGHTS with the message's first bytes, in one sendmsg")
            if header.get("op") != "infer" or header.get("model") != self.model:
                raise ProtocolError(f"this socket serves only inference on {self.model!r}",
                                    "send other requests to the agent's socket")
            if header.get("shm"):
                if shared is None or shared.region is None:
                    raise ProtocolError("the request's tensors are in shared memory, but this connection has "
                                        "none attached", "send an attach message first (agent.client does)")
                body = memoryview(shared.region)
            if header.get("answer_shm") and shared is not None:
                answers = shared.answers  # this request's answer region, even if another is attached meanwhile
            if header.get("image") is not None:
                raise ProtocolError("this socket takes tensors; encoded images go to the agent's socket",
                                    "send the image to the agent's socket (LocalClient.infer_image does)")
            stream = stream_id(header.get("stream"))
            if stream is not None and self._run_stream is None:
                raise no_stream_state(self.model)
            feeds = self._frames.tensors(header, body, key, self._check)
            if self._run_stream is not None:
                out = self._run_stream(feeds, stream)
            elif self._submit is not None and answer_later is not None:
                self._submit(feeds, lambda out, error: answer_later(self._answer(t0, out, error, answers)), owner)
                return None
            else:
                out = self._run(feeds)
        except Exception as exc:
            return self._answer(t0, None, exc)
        return self._answer(t0, out, None, answers)

    def _check(self, tensors: list[Tensor]) -> list[Tensor]:
        return check_inputs(self.model, self.specs, tensors, max_rows=self.max_rows)

    def _answer(self, t0: float, out: list[Tensor] | None, error: BaseException | None, answers=None) -> bytes:
        """The frame for a request's outputs or error; a bug must become an answer, not a dead connection."""
        if error is None:
            try:
                return self._ok_frame(t0, out, answers)
            except Exception as exc:
                error = exc
        if not isinstance(error, EdgewardError):
            log.error("direct request failed", exc_info=error)
        if not isinstance(error, CallerGone):  # nobody asked for it any more: not a failed request
            self.stats.record(None, ok=False)
        return error_frame(error)

    def _ok_frame(self, t0: float, out: list[Tensor], answers=None) -> bytes:
        head = {"v": protocol.VERSION, "status": "ok", "model": self.model, "version": self.version}
        specs = shm.write_tensors(answers, out) if answers is not None else None
        if specs is not None:
            reply = wire.pack({**head, "tensors": specs, "shm": True})
        else:  # the header depends on the outputs' shapes only: made once per shape
            shapes = tuple((t.name, t.dtype, t.shape, len(t.data)) for t in out)
            prefix = self._answer_heads.get(shapes)
            if prefix is None:
                specs, _ = to_frame(out)
                prefix = wire.remember(self._answer_heads, shapes, wire.head_bytes({**head, "tensors": specs}), PLANS)
            reply = b"".join([prefix, *(t.data for t in out)])
        self.stats.record((time.perf_counter() - t0) * 1000, ok=True)
        return reply

    def close(self) -> None:
        self._closed = True
        if self._drain is not None:
            self._drain.close()
        if self._reader:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._sock.close()
        self.path.unlink(missing_ok=True)


class _Conn:
    """One connection read by the batched model's reader: bytes read that are not yet a whole
    message, and the outbox its answers go out through (sent from batch threads)."""

    def __init__(self, sock: socket.socket, drain: Drain):
        self.sock = sock
        self.buf = bytearray()  # bytes read that are not yet a whole message
        self.msg: bytearray | None = None  # a large message being read into its own bytes
        self.got = 0
        self.held = 0  # bytes taken from the server's HeldBytes for the message being read
        self._out = Outbox(sock, drain)
        self.send = self._out.send
        self.close = self._out.close
