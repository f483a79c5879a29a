"""Shared memory for large local requests: an image's bytes cross no socket.

A request larger than the socket's send buffer (about 208 kB on Linux by default) cannot be
sent in one go: the client waits for the worker to read part of it, both sides wake up more
than once, and everything is copied into the kernel and out again. Measured on the
benchmark machine (round trip to a worker, model left out): 588 kB took 429 µs inline and
289 µs in shared memory, 4.8 MB 2.4 ms and 0.86 ms; below the buffer's size (192 kB) both
took the same. So for requests that do not fit the buffer the client
makes a memfd (anonymous memory behind a file descriptor), seals it so it can never shrink,
and passes the descriptor once over its connection to a model's worker (SCM_RIGHTS) with an
``attach`` message. Each request on that connection then carries only its header, with
``"shm": true``, and its tensors' offsets point into the region. The worker maps it
read-only; the tensors are checked and run from there.

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
            n = arr.nbytes
            view = np.frombuffer(self.map, dtype=arr.dtype.newbyteorder("<"), count=arr.size, offset=offset)
            np.copyto(view.reshape(arr.shape), arr)
            specs.append({"name": name, "dtype": dtype, "shape": list(arr.shape), "offset": offset, "nbytes": n})
            offset += -(-n // 64) * 64  # each tensor cache-line aligned
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

    return sum(-(-np.asarray(a).nbytes // 64) * 64 for a in arrays.values())


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


def map_region(fds: list[int], limit: int) -> mmap.mmap:
    """The worker's side: map the one descriptor an attach message brought, read-only, after
    checking that it is a memfd sealed against shrinking and no larger than `limit`. The
    descriptors are closed whatever happens (the mapping keeps the memory)."""
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
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        close_fds(fds)


class Attachment:
    """One connection's region on the worker's side, counted in the server's held bytes."""

    def __init__(self, limit: int, held=None):
        self.limit, self.held = limit, held
        self.region: mmap.mmap | None = None

    def attach(self, msg, fds: list[int]) -> bytes:
        """The answer to a message that brought descriptors: "ok" once its region is mapped
        (replacing the connection's previous one), else an error; the descriptors are closed."""
        from . import protocol, wire
        from .localapi import error_frame

        try:
            header, _ = wire.unpack(msg)
            if header.get("op") != "attach":
                raise ProtocolError(f"a {header.get('op')!r} message brought a file descriptor; only attach may")
            region = map_region(fds, self.limit)
            if self.held is not None:
                try:
                    self.held.take(len(region))
                except Exception:
                    region.close()
                    raise
            self.detach()
            self.region = region
            return wire.pack({"v": protocol.VERSION, "status": "ok", "nbytes": len(region)})
        except Exception as exc:
            close_fds(fds)
            return error_frame(exc)

    def detach(self) -> None:
        """Give the region up. It is not unmapped here: a queued request may still read it, and
        the mapping goes when the last view of it does."""
        if self.region is not None:
            if self.held is not None:
                self.held.give(len(self.region))
            self.region = None
