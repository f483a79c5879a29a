"""Shared memory for large local requests and answers: an image's bytes cross no socket.

A request larger than the socket's send buffer (about 208 kB on Linux by default) cannot be
sent in one go: the client waits for the worker to read part of it, both sides wake up more
than once, and everything is copied into the kernel and out again. Measured with
scripts/bench_local_api.py (round trip to a worker, model left out): a 4.8 MB request took
0.29x as long in shared memory as inline, a 588 kB one 0.6-0.8x; below the buffer's size
both took the same. So for a request that does not fit the buffer the client makes a memfd (anonymous memory behind a file descriptor), seals it so it can never shrink,
and passes the descriptor once over its connection to a model's worker (SCM_RIGHTS) with an
``attach`` message. Each request on that connection then carries only its header, with
``"shm": true``, and its tensors' offsets point into the region. The worker maps it
read-only; the tensors are checked and run from there. Answers the same way: after an
answer too large for the buffer, the client attaches a second region ("use": "answers"),
asks for its answers there (``"answer_shm": true``), and the worker writes them into it
when they fit and sends only the header; the client copies them out before its next call.

Why the seal: a region that shrank while the worker reads it would kill the worker with
SIGBUS, so a region without F_SEAL_SHRINK is refused. A region counts as bytes the worker
holds (api.max_held_mb) for as long as it is attached; it is given up when its connection
closes or the client attaches a larger one. A client may change its region's bytes while
its own request runs: that changes only its own answer. Linux only; elsewhere, and
wherever the worker refuses, the client sends the bytes inline as before.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat

from .errors import ProtocolError

MIN_BYTES = 64 * 1024  # never for fewer tensor bytes than this (the client also waits for a full socket buffer)
_ALIGN = 64 * 1024  # regions grow in these steps, so a client attaches again rarely
_MAX_FDS = 4  # a message bringing more descriptors than this has the rest closed by the kernel


def _aligned(n: int) -> int:
    """`n` rounded up to a cache line: each tensor in a region starts on one."""
    return -(-n // 64) * 64


def available() -> bool:
    """Whether this Python on this OS can make and pass sealed memfds."""
    return all(hasattr(m, n) for m, n in ((os, "memfd_create"), (os, "MFD_ALLOW_SEALING"),
                                          (fcntl, "F_ADD_SEALS"), (socket, "send_fds")))


class Region:
    """The client's side: a sealed memfd of at least `size` bytes, mapped read-write."""

    def __init__(self, size: int):
        self.size = max(_ALIGN, -(-size // _ALIGN) * _ALIGN)
        fd = os.memfd_create("edgeward-request", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd  # closed once it has been passed (the worker holds its own)

    def write(self, arrays: dict) -> list[dict]:
        """Copy named numpy arrays into the region; their specs, with offsets into it."""
        import numpy as np

        from .tensors import ITEMSIZE, dtype_name

        specs, offset = [], 0
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            dtype = dtype_name(arr.dtype)
            if dtype not in ITEMSIZE:
                raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype} cannot be sent",
                                    f"use one of {', '.join(sorted(ITEMSIZE))}")
            if offset + arr.nbytes > self.size:
                raise ValueError(f"{offset + arr.nbytes} bytes do not fit a region of {self.size}")
            view = np.frombuffer(self.map, dtype=arr.dtype.newbyteorder("<"), count=arr.size, offset=offset)
            np.copyto(view.reshape(arr.shape), arr)
            specs.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "offset": offset,
                          "nbytes": arr.nbytes})
            offset += _aligned(arr.nbytes)
        return specs

    def release_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.release_fd()
        try:
            self.map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


def region_bytes(arrays: dict) -> int:
    """The region size `Region.write` needs for these arrays."""
    import numpy as np

    return sum(_aligned(np.asarray(a).nbytes) for a in arrays.values())


def send_attach(sock: socket.socket, frame: bytes, region: Region) -> None:
    """Send an attach message (length prefix and frame in one piece) with the region's descriptor."""
    from .localapi import PREFIX_BYTES

    socket.send_fds(sock, [len(frame).to_bytes(PREFIX_BYTES, "big") + frame], [region.fd])


def recv_prefix(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    """The first `n` bytes of a message, collecting any descriptors that come with them into
    `fds`; None if the peer closed the connection before the first byte."""
    buf = bytearray(n)
    got = 0
    while got < n:
        k, ancillary, _flags, _ = sock.recvmsg_into([memoryview(buf)[got:]], socket.CMSG_SPACE(_MAX_FDS * 4))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got_fds = array.array("i")
                got_fds.frombytes(data[:len(data) - len(data) % got_fds.itemsize])
                fds.extend(got_fds)
        if not k:
            if got == 0:
                return None
            raise ConnectionError("connection closed mid-message")
        got += k
    return bytes(buf)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def map_region(fds: list[int], limit: int, writable: bool = False) -> mmap.mmap:
    """The worker's side: map the one descriptor an attach message brought (read-only for
    requests, read-write for answers), after checking that it is a memfd sealed against
    shrinking and no larger than `limit`. The descriptors are closed whatever happens (the
    mapping keeps the memory)."""
    try:
        if len(fds) != 1:
            raise ProtocolError(f"attach brings one descriptor, this one brought {len(fds)}")
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError("attach: the descriptor is not a memory file", "pass a sealed memfd (agent.shm.Region)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ProtocolError("attach: the memfd is not sealed against shrinking",
                                "add F_SEAL_SHRINK to it (agent.shm.Region does)")
        if not 0 < st.st_size <= limit:
            raise ProtocolError(f"attach: a region of {st.st_size} bytes (this worker takes 1 to {limit})",
                                "attach a smaller region, or raise api.max_request_mb in the agent's config")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=prot)
        except OSError as exc:  # sealed against writing, say
            raise ProtocolError(f"attach: the region cannot be mapped ({exc.strerror or exc})",
                                "pass a memfd the worker may map (agent.shm.Region)") from None
    finally:
        close_fds(fds)


def write_tensors(region: mmap.mmap, tensors: list) -> list[dict] | None:
    """Copy Tensors into an answer region, each at a cache-line aligned offset; their specs, or
    None if they do not fit (the answer then goes inline)."""
    specs, offset = [], 0
    for t in tensors:
        spec = t.spec(offset)
        specs.append(spec)
        offset += _aligned(spec["nbytes"])
    if offset > len(region):
        return None
    for t, spec in zip(tensors, specs):
        region[spec["offset"]:spec["offset"] + spec["nbytes"]] = t.data
    return specs


class Attachment:
    """One connection's regions on the worker's side: one for requests (read-only) and one for
    answers (read-write), each counted in the server's held bytes while attached."""

    USES = ("requests", "answers")

    def __init__(self, limit: int, held=None):
        self.limit, self.held = limit, held
        self._regions: dict[str, mmap.mmap] = {}

    @property
    def region(self) -> mmap.mmap | None:
        """Where requests marked "shm" have their tensors."""
        return self._regions.get("requests")

    @property
    def answers(self) -> mmap.mmap | None:
        """Where answers go when their request asks ("answer_shm") and they fit."""
        return self._regions.get("answers")

    def attach(self, msg, fds: list[int]) -> bytes:
        """The answer to a message that brought descriptors: "ok" once its region is mapped
        (replacing the connection's previous one for that use), else an error; the descriptors
        are closed."""
        from . import protocol, wire
        from .localapi import error_frame

        try:
            header, _ = wire.unpack(msg)
            if header.get("op") != "attach":
                raise ProtocolError(f"a {header.get('op')!r} message brought a file descriptor; only attach may")
            use = header.get("use", "requests")
            if use not in self.USES:
                raise ProtocolError(f"attach: use {use!r} is not one of {', '.join(self.USES)}")
            region = map_region(fds, self.limit, writable=use == "answers")
            if self.held is not None:
                try:
                    self.held.take(len(region))
                except Exception:
                    region.close()
                    raise
            self._give(use)
            self._regions[use] = region
            return wire.pack({"v": protocol.VERSION, "status": "ok", "use": use, "nbytes": len(region)})
        except Exception as exc:
            close_fds(fds)
            return error_frame(exc)

    def _give(self, use: str) -> None:
        """Give up the region for `use`. It is not unmapped here: a queued request may still use
        it, and the mapping goes when the last view of it does."""
        region = self._regions.pop(use, None)
        if region is not None and self.held is not None:
            self.held.give(len(region))

    def detach(self) -> None:
        for use in self.USES:
            self._give(use)
