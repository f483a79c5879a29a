"""Answers to a batched model's callers, sent without ever blocking the batch thread.

A batch thread answers every caller of its batch in turn. If it waited on one caller's
socket (a client that sends requests without reading the answers fills the socket's
buffer), every other caller of that model would wait with it. So an answer is sent
without waiting: in the usual case the socket's buffer takes it whole at once. What does
not fit (a large answer, or a caller that is not reading) is kept in that connection's
outbox and sent by a drain thread as the caller reads. An outbox that holds more than
one answer past MAX_BACKLOG_BYTES, or has not emptied after DRAIN_TIMEOUT_S, belongs to
a caller that is not reading: its connection is dropped, and the memory with it.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time

from .localapi import message_views, send_views

log = logging.getLogger(__name__)

MAX_BACKLOG_BYTES = 4 * 1024 * 1024  # unsent answers a connection may hold beyond the one being sent
DRAIN_TIMEOUT_S = 10.0  # how long a caller may take to read what its outbox holds


class Outbox:
    """One connection's answers: sent in order, never interleaved, never to a closed socket."""

    def __init__(self, sock: socket.socket, drain: "Drain"):
        self.sock = sock
        self._drain = drain
        self._lock = threading.Lock()
        self._backlog: list[list[memoryview]] = []  # answers not yet (wholly) sent, oldest first
        self._backlog_bytes = 0
        self.since = 0.0  # when the backlog began, or last got smaller
        self.closed = False

    def send(self, frame: bytes | list) -> None:
        with self._lock:
            if self.closed:
                return  # the caller hung up before its answer
            views = message_views(frame)
            if not self._backlog:
                try:
                    views = send_views(self.sock, views, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    return  # it hangs up now: its reader sees that and closes
                if not views:
                    return
                self.since = time.monotonic()
                self._drain.watch(self)
            elif self._backlog_bytes > MAX_BACKLOG_BYTES:
                self._drop_locked(f"it holds {self._backlog_bytes} bytes of answers it has not read")
                return
            self._backlog.append(views)
            self._backlog_bytes += sum(len(v) for v in views)

    def flush(self) -> bool:
        """Send what the socket takes now (the drain thread, when it is writable); True once empty."""
        with self._lock:
            if self.closed:
                return True
            while self._backlog:
                before = sum(len(v) for v in self._backlog[0])
                try:
                    rest = send_views(self.sock, self._backlog[0], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                except OSError:
                    self._drop_locked(None)
                    return True
                sent = before - sum(len(v) for v in rest)
                if sent:
                    self.since = time.monotonic()  # the caller is reading: its time starts again
                self._backlog_bytes -= sent
                if rest:
                    self._backlog[0] = rest
                    return False
                self._backlog.pop(0)
            return True

    def drop(self, why: str | None) -> None:
        with self._lock:
            self._drop_locked(why)

    def _drop_locked(self, why: str | None) -> None:
        """Stop sending and shut the socket: the thread reading it sees the end and closes it."""
        if why and not self.closed:
            log.warning("dropping a connection to a model's socket: %s", why)
        self.closed = True
        self._backlog.clear()
        self._backlog_bytes = 0
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            watched = bool(self._backlog)
            self.closed = True
            self._backlog.clear()
            self.sock.close()
        if watched:
            self._drain.nudge()  # so that it forgets this socket before its number is used again


class Drain:
    """The thread that sends what outboxes could not send at once; started when first needed."""

    def __init__(self, timeout_s: float | None = None):
        self.timeout_s = DRAIN_TIMEOUT_S if timeout_s is None else timeout_s
        self._new: queue.SimpleQueue[Outbox | None] = queue.SimpleQueue()
        self._started: bool | None = False  # None once closed
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()

    def watch(self, box: Outbox) -> None:
        with self._lock:
            if self._started is None:
                return  # closed
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="direct-drain", daemon=True).start()
        self._new.put(box)
        self.nudge()

    def close(self) -> None:
        with self._lock:
            started, self._started = self._started, None  # None: closed, no thread starts after this
        if started is None:
            return
        if not started:
            self._wake_r.close()
            self._wake_w.close()
            return
        self._new.put(None)
        self.nudge()

    def nudge(self) -> None:
        try:
            self._wake_w.send(b"x", socket.MSG_DONTWAIT)
        except OSError:
            pass  # a wake-up is already pending, or the drain is closed

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        watched: set[Outbox] = set()
        try:
            while True:
                now = time.monotonic()
                for box in [b for b in watched if now - b.since > self.timeout_s]:
                    box.drop(f"it has not read its answers for {self.timeout_s:g} s")
                    self._forget(sel, watched, box)
                self._forget_closed(sel, watched)
                wait = min((b.since + self.timeout_s - now for b in watched), default=None)
                for key, _ in sel.select(None if wait is None else max(wait, 0.01)):
                    if key.data is None:
                        if not self._take_new(sel, watched):
                            return
                    elif key.data.flush():
                        self._forget(sel, watched, key.data)
        finally:
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_new(self, sel: selectors.BaseSelector, watched: set) -> bool:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        self._forget_closed(sel, watched)
        while True:
            try:
                box = self._new.get_nowait()
            except queue.Empty:
                return True
            if box is None:
                return False
            if box not in watched and not box.closed:
                try:
                    sel.register(box.sock, selectors.EVENT_WRITE, box)
                except (OSError, ValueError):
                    continue  # closed meanwhile
                watched.add(box)

    @classmethod
    def _forget_closed(cls, sel: selectors.BaseSelector, watched: set) -> None:
        for box in [b for b in watched if b.closed]:
            cls._forget(sel, watched, box)

    @staticmethod
    def _forget(sel: selectors.BaseSelector, watched: set, box: Outbox) -> None:
        watched.discard(box)
        try:
            sel.unregister(box.sock)
        except (KeyError, ValueError, OSError):
            pass
