"""Receiving a bundle: MQTT chunks or an http(s) download, resumable across disconnects and restarts.

The deploy request names the bundle by sha256 and size, so the agent knows exactly
how many chunks to expect and where each belongs. Chunks are written at their offset
into `incoming/<sha256>.part` (order does not matter, duplicates are harmless); a
chunk that carries its own sha256 is checked before it is written. Which chunks have
arrived (with their hashes) is kept beside the part file in `<sha256>.json`, so a
deploy sent again after an agent restart asks only for what is still missing; on
reload, chunks whose bytes no longer match their hash are asked for again.

A URL transfer fills the same part file front to back with Range requests, so it too
resumes after a dropped connection or a restart. Nothing reaches the model store until
the whole file hashes to the sha256 the deploy named.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import IntegrityError, ProtocolError, DownloadError

log = logging.getLogger(__name__)

STALE_AFTER_S = 7 * 24 * 3600  # a transfer nobody resumed for a week is cleaned up at start
SAVE_EVERY_S = 1.0             # how often the list of received chunks is written while chunks arrive


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Transfer:
    sha256: str
    size: int
    chunk_size: int
    part_path: Path
    reply_to: str | None = None
    correlation: bytes | None = None
    received: dict[int, str] = field(default_factory=dict)  # chunk index -> its sha256 ("" if not sent)
    _saved_at: float = 0.0

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @property
    def state_path(self) -> Path:
        return self.part_path.with_suffix(".json")

    def missing(self) -> list[int]:
        return [i for i in range(self.n_chunks) if i not in self.received]

    @property
    def complete(self) -> bool:
        return len(self.received) == self.n_chunks

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    # ---------------------------------------------------------------- persistence

    def open(self) -> None:
        """Create (or keep, for a resumed transfer) the sparse part file of the final size."""
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        self.save()

    def save(self) -> None:
        """Write which chunks have arrived (atomically: a crash leaves the old list or the new one)."""
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size,
                                   "received": {str(i): h for i, h in sorted(self.received.items())}}))
        os.replace(tmp, self.state_path)
        self._saved_at = time.monotonic()

    @classmethod
    def resume(cls, part_path: Path) -> "Transfer | None":
        """Reload a transfer left by an earlier run; None (and its files removed) if it cannot be trusted."""
        state_path = part_path.with_suffix(".json")
        try:
            raw = json.loads(state_path.read_text())
            t = cls(raw["sha256"], int(raw["size"]), int(raw["chunk_size"]), part_path,
                    received={int(i): str(h) for i, h in raw["received"].items()})
            if t.sha256 != part_path.stem or part_path.stat().st_size != t.size:
                raise ValueError("part file does not match its state")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cls._remove(part_path)
            return None
        # bytes written just before a power cut may not have reached the disk: check what we can
        with open(part_path, "rb") as f:
            for index, digest in list(t.received.items()):
                if index >= t.n_chunks:
                    del t.received[index]
                elif digest:
                    f.seek(index * t.chunk_size)
                    if _sha256(f.read(t.chunk_len(index))) != digest:
                        del t.received[index]
        return t

    @staticmethod
    def _remove(part_path: Path) -> None:
        for p in (part_path, part_path.with_suffix(".json"), part_path.with_suffix(".json.tmp")):
            p.unlink(missing_ok=True)

    def discard(self) -> None:
        self._remove(self.part_path)

    # ---------------------------------------------------------------- chunks over MQTT

    def add(self, index: int, offset: int, data: bytes, sha256: str | None = None) -> None:
        """Write one chunk at its place after checking it is the chunk the header claims."""
        if index >= self.n_chunks:
            raise ProtocolError(f"chunk {index} is past the last chunk ({self.n_chunks - 1})")
        expected_len = self.chunk_len(index)
        if offset != index * self.chunk_size or len(data) != expected_len:
            raise ProtocolError(f"chunk {index}: offset {offset} / {len(data)} bytes, "
                                f"expected offset {index * self.chunk_size} / {expected_len} bytes")
        digest = _sha256(data) if sha256 else ""
        if sha256 and digest != sha256:
            raise IntegrityError(f"chunk {index} hashes to {digest[:12]}…, its header says {sha256[:12]}…",
                                 "the chunk was damaged in transit; it is asked for again")
        fd = os.open(self.part_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.received[index] = digest
        if self.complete or time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()

    # ---------------------------------------------------------------- http(s)

    def download(self, url: str, should_stop: Callable[[], bool], cafile: str | None = None,
                 attempts: int = 5, timeout_s: float = 30.0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """Fill the part file from `url`, resuming with Range requests after dropped connections.

        Resumes from the first missing chunk; a server that ignores Range makes it start over.
        Raises DownloadError after `attempts` failures in a row, or when `should_stop()` says so.
        """
        context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
        failures = 0
        while not self.complete:
            if should_stop():
                raise DownloadError("download interrupted: the agent is stopping", "deploy again to resume it")
            start_chunk = self.missing()[0]
            offset = start_chunk * self.chunk_size
            req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-",
                                                       "User-Agent": "edgeward-agent"})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
                    if resp.status not in (200, 206):
                        raise DownloadError(f"download answered HTTP {resp.status}", "check the URL")
                    start = _range_start(resp.headers.get("Content-Range")) if resp.status == 206 else 0
                    if start != offset and start != 0:
                        raise ConnectionError(f"asked for bytes from {offset}, the server sent them from {start}")
                    if start == 0 and offset:
                        log.info("%s ignores Range requests: downloading from the start", url)
                        self.received.clear()
                        offset = 0
                    self._fill_from(resp, offset, should_stop, progress)
                failures = 0
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # the URL is wrong: retrying will not help
                    raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}",
                                      "check the URL (and that it serves the bundle the deploy names)") from exc
                failures += 1
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # all worth a retry
                failures += 1
                last = str(getattr(exc, "reason", exc))
            finally:
                self.save()
            if not self.complete and failures:
                if failures >= attempts:
                    raise DownloadError(f"download of {url} failed {failures} times in a row ({last}); "
                                      f"{len(self.received)}/{self.n_chunks} chunks kept",
                                      "check the server, then deploy again to resume")
                time.sleep(min(0.2 * 2 ** failures, 5.0))

    def _fill_from(self, resp, offset: int, should_stop: Callable[[], bool],
                   progress: Callable[[int, int], None] | None) -> None:
        """Copy the response into the part file, marking each chunk once all its bytes are written."""
        index = offset // self.chunk_size
        with open(self.part_path, "r+b") as f:
            f.seek(offset)
            while index < self.n_chunks:
                want = self.chunk_len(index)
                buf = bytearray()
                while len(buf) < want:
                    piece = resp.read(min(want - len(buf), 1 << 16))
                    if not piece:
                        raise ConnectionError(f"connection closed at byte {index * self.chunk_size + len(buf)}"
                                              f" of {self.size}")
                    buf += piece
                f.write(buf)
                self.received[index] = _sha256(buf)
                index += 1
                if progress:
                    progress(len(self.received), self.n_chunks)
                if should_stop():
                    f.flush()
                    raise DownloadError("download interrupted: the agent is stopping", "deploy again to resume it")
            if resp.read(1):
                raise IntegrityError(f"the server sent more than the {self.size} bytes the deploy named",
                                     "the URL serves a different file than the deploy names")

    # ---------------------------------------------------------------- the end

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


def _range_start(content_range: str | None) -> int | None:
    """The first byte a 206 answer holds, from `Content-Range: bytes START-END/TOTAL`; None if unreadable."""
    try:
        unit, span = (content_range or "").split(" ", 1)
        return int(span.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def resume_all(incoming: Path) -> dict[str, Transfer]:
    """The transfers an earlier run left in `incoming/`, checked; stray and week-old files are removed."""
    found: dict[str, Transfer] = {}
    now = time.time()
    for part in incoming.glob("*.part"):
        state = part.with_suffix(".json")
        if not state.exists() or now - state.stat().st_mtime > STALE_AFTER_S:
            Transfer._remove(part)
            continue
        t = Transfer.resume(part)
        if t is not None:
            found[t.sha256] = t
    parts = {p.name for p in incoming.glob("*.part")}  # what is left after the clean-up above
    for orphan in list(incoming.glob("*.json")) + list(incoming.glob("*.json.tmp")):
        if orphan.name.split(".")[0] + ".part" not in parts:
            orphan.unlink(missing_ok=True)
    return found
