"""Reassembling a bundle that arrives as MQTT chunks.

The deploy request names the bundle by sha256 and size, so the agent knows exactly
how many chunks to expect and where each belongs. Chunks are written at their offset
into `incoming/<sha256>.part` (order does not matter, duplicates are harmless), and
the whole file is hashed once the last one lands. Nothing reaches the model store
until the hash matches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IntegrityError, ProtocolError


@dataclass
class Transfer:
    sha256: str
    size: int
    chunk_size: int
    part_path: Path
    reply_to: str | None = None
    correlation: bytes | None = None
    received: set[int] = field(default_factory=set)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def missing(self) -> list[int]:
        return [i for i in range(self.n_chunks) if i not in self.received]

    @property
    def complete(self) -> bool:
        return len(self.received) == self.n_chunks

    def open(self) -> None:
        """Create (or keep, for a resumed transfer) the sparse part file of the final size."""
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def add(self, index: int, offset: int, data: bytes) -> None:
        """Write one chunk at its place after checking it is the chunk the header claims."""
        if index >= self.n_chunks:
            raise ProtocolError(f"chunk {index} is past the last chunk ({self.n_chunks - 1})")
        expected_len = min(self.chunk_size, self.size - index * self.chunk_size)
        if offset != index * self.chunk_size or len(data) != expected_len:
            raise ProtocolError(f"chunk {index}: offset {offset} / {len(data)} bytes, "
                                f"expected offset {index * self.chunk_size} / {expected_len} bytes")
        fd = os.open(self.part_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.received.add(index)

    def finish(self) -> Path:
        """Hash the assembled file; return its path or raise (and delete it) if it is not the bundle asked for."""
        h = hashlib.sha256()
        with open(self.part_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != self.sha256:
            self.discard()
            raise IntegrityError(f"received bundle hashes to {h.hexdigest()[:12]}…, the deploy named {self.sha256[:12]}…",
                                 "the bytes were corrupted or the deploy request names the wrong bundle; deploy again")
        return self.part_path

    def discard(self) -> None:
        self.part_path.unlink(missing_ok=True)
