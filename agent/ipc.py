"""Frames between the agent and its model workers over a pipe: a JSON header and raw tensor bytes.

    uint32 header length | uint32 body length | header (UTF-8 JSON) | body

Both ends are ours, so this is simpler than the network frame (agent/wire.py): no magic,
no hostile input. Reads fill a preallocated buffer, so a large tensor is copied once.
"""

from __future__ import annotations

import io
import json
import os
import struct

_LEN = struct.Struct(">II")


class PipeClosed(EOFError):
    """The other end went away (a worker that exited or crashed)."""


def send(fd: int, header: dict, body: bytes | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    data = memoryview(_LEN.pack(len(head), len(body)) + head + bytes(body)) if len(body) < 65536 else None
    try:
        if data is not None:
            while data:
                data = data[os.write(fd, data):]
        else:
            for part in (memoryview(_LEN.pack(len(head), len(body)) + head), memoryview(body)):
                while part:
                    part = part[os.write(fd, part):]
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise PipeClosed(str(exc)) from exc


def _read_exactly(reader: io.FileIO, n: int) -> memoryview:
    buf = memoryview(bytearray(n))
    got = 0
    while got < n:
        k = reader.readinto(buf[got:])
        if not k:
            raise PipeClosed("pipe closed")
        got += k
    return buf


def recv(reader: io.FileIO) -> tuple[dict, memoryview]:
    head_len, body_len = _LEN.unpack(_read_exactly(reader, _LEN.size))
    head = _read_exactly(reader, head_len)
    body = _read_exactly(reader, body_len) if body_len else memoryview(b"")
    return json.loads(bytes(head)), body


def reader_for(fd: int) -> io.FileIO:
    return io.FileIO(fd, "rb", closefd=False)
