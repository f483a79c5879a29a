"""A bounded on-disk queue of telemetry and events for while the broker is unreachable.

paho keeps nothing on disk, so a board that loses its network (or restarts while
offline) would lose what happened in the meantime. The spool keeps those messages
in SQLite (stdlib, transactional: a crash leaves the queue as of the last commit),
and the agent delivers them after reconnecting, oldest first, payloads unchanged
so they carry their original timestamps. Delivery is at least once: an entry is
deleted only after the broker acknowledged it.

When the spool is full, the oldest telemetry goes first (events matter more and are
few); only if no telemetry is left do the oldest events go. What was dropped is counted
and reported.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

KINDS = ("telemetry", "event")


@dataclass
class SpoolStats:
    queued: int
    queued_bytes: int
    dropped_telemetry: int
    dropped_events: int


class Spool:
    def __init__(self, path: str | Path, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
                         " topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS dropped (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)")
        self._bytes = self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM queue").fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    def append(self, kind: str, topic: str, payload: bytes, qos: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"spool kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO queue (kind, topic, payload, qos) VALUES (?, ?, ?, ?)",
                                 (kind, topic, payload, qos))
                self._bytes += len(payload)
                self._make_room()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _make_room(self) -> None:
        """Drop the oldest telemetry, then the oldest events, until the queue fits max_bytes."""
        for kind in KINDS:
            while self._bytes > self.max_bytes:
                row = self._db.execute("SELECT id, LENGTH(payload) FROM queue WHERE kind = ? ORDER BY id LIMIT 1",
                                       (kind,)).fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM queue WHERE id = ?", (row[0],))
                self._db.execute("INSERT INTO dropped (kind, n) VALUES (?, 1) ON CONFLICT(kind) DO UPDATE SET n = n + 1",
                                 (kind,))
                self._bytes -= row[1]

    def peek(self, limit: int = 64) -> list[tuple[int, str, bytes, int]]:
        """The oldest entries as (id, topic, payload, qos), without removing them."""
        with self._lock:
            return self._db.execute("SELECT id, topic, payload, qos FROM queue ORDER BY id LIMIT ?", (limit,)).fetchall()

    def remove(self, ids: list[int]) -> None:
        """Forget entries the broker has acknowledged."""
        if not ids:
            return
        with self._lock:
            marks = ",".join("?" * len(ids))
            freed = self._db.execute(f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM queue WHERE id IN ({marks})",
                                     ids).fetchone()[0]
            self._db.execute(f"DELETE FROM queue WHERE id IN ({marks})", ids)
            self._bytes -= freed

    def stats(self) -> SpoolStats:
        with self._lock:
            queued = self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            dropped = dict(self._db.execute("SELECT kind, n FROM dropped").fetchall())
        return SpoolStats(queued, self._bytes, dropped.get("telemetry", 0), dropped.get("event", 0))

    def close(self) -> None:
        with self._lock:
            self._db.close()
