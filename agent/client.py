"""A Python client for the agent's local API (agent/localapi.py): numpy in, numpy out.

    from agent.client import LocalClient
    with LocalClient() as c:                      # /run/edgeward/agent.sock by default
        out = c.infer("digits", {"input": x})     # dict of numpy arrays
        out = c.infer("kws", frame, stream="mic-0")   # stateful model: the model's worker keeps the state

Thread-safe: each thread gets its own connections, so concurrent callers do not queue
behind each other here (a batched model batches them). The client asks the agent
once where a model's worker listens and then talks to it directly (agent/direct.py),
falling back to the agent when that worker is replaced or restarted. There, a request
larger than the socket's send buffer (~208 kB: a 224x224 float image, say) travels in
shared memory (agent/shm.py): its tensors are copied once into a sealed memfd attached to
the connection, and only the header crosses the socket (`shared_memory=False` to send them
inline; a worker that refuses gets them inline anyway).

While it waits for an answer, a call polls the socket for up to `spin_us` (500 µs) before
it sleeps, as the agent does for the next request (api.spin_us): waking a sleeping core
costs tens of microseconds on small boards and VMs, a large share of a fast model's run.
When the answers take a little longer (up to SLEEP_THEN_POLL_MAX windows), the call
sleeps through the soonest of the last few waits less half a window, then polls for one:
the answer then usually finds it awake, for at most `spin_us` of CPU (hybrid polling, as
NVMe drivers do). Longer waits are slept through: the wake-up is then a small part. It
polls only when it is this client's one call in flight, so many concurrent callers never
burn the cores the model needs. `spin_us=0` turns it off; on a one-core board it is off.
"""

from __future__ import annotations

import copy
import os
import select
import socket
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from . import protocol, shm, wire
from .errors import EdgewardError, ProtocolError, error_class
from .localapi import recv_message, send_message
from .polling import linger
from .tensors import from_frame, to_numpy

DEFAULT_SOCKET = os.environ.get("EDGEWARD_SOCKET", "/run/edgeward/agent.sock")
SLEEP_THEN_POLL_MAX = 4  # waits up to this many spin_us windows: sleep through most, poll for the answer
RECENT_WAITS = 4  # answers the expected wait is taken from


class LocalClient:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 60.0, direct: bool = True, spin_us: int = 500,
                 shared_memory: bool = True):
        self.path = path
        # large requests to a model's worker travel in shared memory where the OS allows (agent/shm.py)
        self.shared_memory = shared_memory and shm.available()
        self.timeout = timeout
        self.spin_s = max(0, spin_us) / 1e6 if (os.cpu_count() or 1) > 1 else 0.0
        self._in_flight = 0
        self._waits: dict[str | None, deque] = {}  # socket -> seconds its last few answers took
        self.direct = direct          # talk to models' workers directly (one hop fewer)
        self._routes: dict[str, str | None] = {}
        self._local = threading.local()
        self._frames = wire.TensorFrames()  # answers' headers parsed and checked once per distinct header
        self._heads: dict = {}  # requests' head bytes, made once per header and shapes (wire.frame_parts)
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()

    def _conn(self, path: str | None = None) -> socket.socket:
        """This thread's connection to `path` (the agent's socket by default), made on first use."""
        path = path or self.path
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(path)
        if conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(self.timeout)
            try:
                conn.connect(path)
            except OSError as exc:
                conn.close()
                raise EdgewardError(f"cannot reach the agent at {path}: {exc.strerror or exc}",
                                    "is the agent running (systemctl status edgeward-agent)? "
                                    "is api.socket set to this path?") from exc
            conns[path] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _call(self, frame: bytes | list, path: str | None = None) -> tuple[dict, memoryview, bytes]:
        """Send one request and wait for its answer: (header, body, the header's bytes). The
        header is shared with other answers that had the same bytes: read it only."""
        conn = self._conn(path)
        with self._lock:
            self._in_flight += 1
            alone = self.spin_s > 0 and self._in_flight == 1
        waits = self._waits.get(path) or [0.0]
        try:
            t0 = time.perf_counter()
            try:
                send_message(conn, frame)
            except (BrokenPipeError, ConnectionResetError):
                # refused before it was all sent (too large, say): the answer saying why may be waiting
                reply = recv_message(conn)
                self._drop(path)  # the agent has closed its end
                if reply is None:
                    raise
            else:
                if alone:
                    self._await(conn, t0, waits)
                reply = recv_message(conn)
            self._waits.setdefault(path, deque(maxlen=RECENT_WAITS)).append(time.perf_counter() - t0)
        except (OSError, ConnectionError) as exc:
            self._drop(path)
            raise EdgewardError(f"the agent closed the connection: {exc}", "retry; check the agent's log") from exc
        finally:
            with self._lock:
                self._in_flight -= 1
        if reply is None:
            self._drop(path)
            raise EdgewardError("the agent closed the connection", "retry; check the agent's log")
        header, body, key = self._frames.unpack(reply)
        if header.get("status") != "ok":
            raise error_class(header.get("code"))(header.get("error", "agent error"))
        return header, body, key

    def _await(self, conn: socket.socket, t0: float, waits) -> None:
        """Be awake when the answer comes (see the module's docstring); returns when it may have.
        The last wait says whether to poll at all (so a model that got slow stops the polling at
        once); the soonest of the last few says how long to sleep first (scheduling jitter only
        ever makes a wait longer)."""
        if waits[-1] <= self.spin_s:
            linger(conn, self.spin_s)
        elif waits[-1] <= SLEEP_THEN_POLL_MAX * self.spin_s:
            nap = t0 + min(waits) - self.spin_s / 2 - time.perf_counter()
            if nap <= 0 or not select.select([conn], [], [], nap)[0]:  # an early answer wakes it
                linger(conn, self.spin_s)

    def _drop(self, path: str | None) -> None:
        conn = getattr(self._local, "conns", {}).pop(path or self.path, None)
        if conn is not None:
            conn.close()
        for use in ("requests", "answers"):
            region = self._regions().pop((path or self.path, use), None)
            if region:
                region.close()

    def _route(self, model: str) -> str | None:
        """The model worker's own socket, if the agent offers one, else None."""
        if model not in self._routes:
            try:
                header, _, _ = self._call(wire.pack({"v": protocol.VERSION, "op": "route", "model": model}))
                self._routes[model] = header.get("socket")
            except ProtocolError:  # an agent without routes: always go through it
                self._routes[model] = None
        return self._routes[model]

    def infer(self, model: str, feeds: dict | np.ndarray, stream: str | None = None) -> dict[str, np.ndarray]:
        """Run `model` on `feeds` (a dict of named arrays, or one array for a one-input model)."""
        if not isinstance(feeds, dict):
            feeds = {"input": feeds}
        extra = {"stream": stream} if stream is not None else {}
        direct = self._route(model) if self.direct else None
        if direct is not None:
            try:
                header, body, key = self._call(self._request(direct, model, feeds, extra), direct)
                return self._outputs(direct, header, body, key)
            except EdgewardError as exc:
                if exc.code not in ("error", "model_crashed", "busy"):
                    raise  # the model's own answer (bad input, ...): the same through the agent
                self._routes.pop(model, None)  # replaced or restarted: ask the agent again
        header, body, key = self._call(wire.frame_parts(feeds, self._heads, v=protocol.VERSION, op="infer",
                                                        model=model, **extra))
        return {t.name: to_numpy(t) for t in self._frames.tensors(header, body, key)}

    def infer_image(self, model: str, image: bytes | str | os.PathLike, preprocess: str | None = None) -> dict:
        """Run `model` on one encoded image (JPEG, PNG, ...: its bytes, or a file's path). The
        agent prepares it as the model's bundle says (or as `preprocess` says), so the caller
        needs no image library. Returns {"outputs": {name: array}}, with "top1" and "class" for a
        classifier (class where the bundle names its classes) or "detections" for a detector
        ([{"box": [ymin, xmin, ymax, xmax], "class_id", "class", "score"}], best first)."""
        data = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        extra = {"preprocess": preprocess} if preprocess else {}
        header, body, key = self._call(wire.frame_parts({"image": np.frombuffer(bytes(data), np.uint8)}, None,
                                                        v=protocol.VERSION, op="infer", model=model, image=True,
                                                        **extra))
        return {"outputs": {t.name: to_numpy(t) for t in self._frames.tensors(header, body, key)},
                **{k: header[k] for k in protocol.ANSWER_LABELS if k in header}}

    # -- shared memory on a worker's socket (agent/shm.py) -------------------------------------------
    def _request(self, path: str, model: str, feeds: dict, extra: dict) -> bytes | list:
        """The request for a model worker's socket: its tensors in this connection's request
        region when they do not fit the socket's send buffer (attaching one first if needed),
        else inline; asking for the answer in the answer region when one is attached."""
        head = {"v": protocol.VERSION, "op": "infer", "model": model, **extra}
        regions = self._regions()
        if regions.get((path, "answers")):
            head["answer_shm"] = True
        need = shm.region_bytes(feeds) if self.shared_memory else 0
        if need >= shm.MIN_BYTES and need > self._sndbuf(path):  # else sent in one go: no faster in a region
            region = regions.get((path, "requests"))
            if region is None or (region and region.size < need):
                region = self._attach(path, need, "requests")
            if region:
                return wire.pack({**head, "tensors": region.write(feeds), "shm": True})
        return wire.frame_parts(feeds, self._heads, **head)

    def _outputs(self, path: str, header: dict, body: memoryview, key: bytes) -> dict[str, np.ndarray]:
        """The answer's arrays: copied out of the answer region when the worker wrote them there
        (the next answer overwrites it), else views of the answer's own bytes. An answer too
        large for the socket's send buffer that came inline makes this connection attach an
        answer region for the next ones."""
        regions = self._regions()
        if header.get("shm"):
            answers = regions.get((path, "answers"))
            if not answers:
                raise ProtocolError("the worker answered in shared memory this connection has not attached")
            return {t.name: to_numpy(t).copy() for t in from_frame(header, memoryview(answers.map))}
        out = {t.name: to_numpy(t) for t in self._frames.tensors(header, body, key)}
        if (self.shared_memory and len(body) >= shm.MIN_BYTES and len(body) > self._sndbuf(path)
                and regions.get((path, "answers")) is not False):
            self._attach(path, len(body), "answers")
        return out

    def _sndbuf(self, path: str) -> int:
        return self._conn(path).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def _regions(self) -> dict:
        """This thread's regions by (socket path, "requests" or "answers"); False where refused."""
        regions = getattr(self._local, "regions", None)
        if regions is None:
            regions = self._local.regions = {}
        return regions

    def _attach(self, path: str, need: int, use: str):
        """A new region of at least `need` bytes, attached to this thread's connection to `path`
        for `use` (replacing the one it had), or None if the worker refused: then this connection
        goes on inline for that use."""
        regions = self._regions()
        conn = self._conn(path)
        region = shm.Region(need)
        try:
            shm.send_attach(conn, wire.pack({"v": protocol.VERSION, "op": "attach", "use": use,
                                             "nbytes": region.size}), region)
            reply = recv_message(conn)
        except OSError:
            reply = None
        finally:
            region.release_fd()
        if reply is None:
            region.close()
            self._drop(path)
            return None
        header, _ = wire.unpack(reply)
        old = regions.pop((path, use), None)
        if old:
            old.close()  # the worker gave it up when it took the new one (or refused)
        if header.get("status") != "ok":
            region.close()
            regions[(path, use)] = False
            return None
        regions[(path, use)] = region
        return region

    def reset(self, model: str, stream: str) -> bool:
        """Forget a stream's state; True if the agent had one."""
        header, _, _ = self._call(wire.pack({"v": protocol.VERSION, "op": "reset", "model": model, "stream": stream}))
        return bool(header.get("reset"))

    def models(self) -> list[dict]:
        header, _, _ = self._call(wire.pack({"v": protocol.VERSION, "op": "models"}))
        return copy.deepcopy(header["models"])  # the header may be shared with later answers: the caller's own

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        for region in self._regions().values():  # this thread's; other threads' go with them
            if region:
                region.close()
        self._regions().clear()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
