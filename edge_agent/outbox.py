"""Durable, bounded, ordered queue of messages waiting for the broker's acknowledgement.

mqtt.py puts every verdict and heatmap here first and deletes it only after the PUBACK, so a
broker outage or a killed process loses nothing. sqlite in WAL mode: one file, crash-safe.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Per-row bookkeeping (id, kind, qos, timestamps, sqlite page overhead) counted against max_bytes,
# so a flood of tiny messages is bounded too.
ROW_OVERHEAD_BYTES = 64

# Below this much free space on the outbox's file system, heatmaps are refused (and old ones
# dropped to make room) so that what is left goes to verdicts: sqlite needs a few pages of WAL
# per insert, and a disk that is really full refuses every write.
MIN_FREE_BYTES = 1024 * 1024

# The only kind that may be dropped to make room: a heatmap is an illustration of a verdict,
# the verdict is the record the line acts on.
EXPENDABLE_KIND = "heatmap"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    properties TEXT NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id);
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One queued MQTT publish; ids grow in put order and survive restarts."""

    id: int
    kind: str  # "verdict", "heatmap", ...
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float  # epoch s, when put
    properties: dict[str, str] = field(default_factory=dict)  # MQTT 5 user properties

    @property
    def size(self) -> int:
        return _size(self.topic, self.payload)


def _size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic.encode()) + ROW_OVERHEAD_BYTES


class Outbox:
    """A bounded FIFO on disk. Thread-safe; one instance per directory.

    When a put would exceed max_bytes, the oldest heatmaps are dropped first; only when no
    heatmap is left are the oldest verdicts dropped (logged at ERROR). A heatmap that does not
    fit without dropping a verdict is refused instead. Drops are counted in `dropped`.
    """

    def __init__(self, dir: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes} must be positive")
        self.dir = Path(dir)
        self.max_bytes = int(max_bytes)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "outbox.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # WAL + synchronous=NORMAL: a killed process loses nothing and a power cut leaves a
        # consistent file (minus the last moments). FULL would fsync on every put and ack: about
        # 6 ms each on a station SSD, which the inference thread would wait for on every frame.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._dropped: collections.Counter[str] = collections.Counter()
        self._closed = False
        if self._depth:
            logger.info("outbox %s holds %d undelivered messages (%d bytes)", self.path, self._depth, self._bytes)

    def put(
        self,
        kind: str,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, str] | None = None,
    ) -> int | None:
        """Queue a message; returns its id, or None when it was refused for lack of room."""
        size = _size(topic, payload)
        props = json.dumps(properties or {})
        with self._lock:
            if size > self.max_bytes:
                self._count_drop(kind, f"message of {size} bytes is larger than the whole outbox ({self.max_bytes})")
                return None
            while self._bytes + size > self.max_bytes:
                if not self._drop_oldest(EXPENDABLE_KIND):
                    if kind == EXPENDABLE_KIND:
                        self._count_drop(kind, "outbox full of verdicts")
                        return None
                    self._drop_oldest(None)
            if self._disk_low(size):
                if kind == EXPENDABLE_KIND:
                    self._count_drop(kind, f"less than {MIN_FREE_BYTES} bytes free on the outbox's disk")
                    return None
                self._drop_oldest(EXPENDABLE_KIND)  # its pages are reused by this insert
                self._shrink_wal()
            try:
                cur = self._db.execute(
                    "INSERT INTO messages (kind, topic, payload, qos, retain, properties, created_at, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, topic, payload, qos, int(retain), props, time.time(), size),
                )
            except sqlite3.OperationalError as e:
                if "full" not in str(e):
                    raise
                self._count_drop(kind, f"the outbox's disk is full ({e})")
                return None
            self._depth += 1
            self._bytes += size
            return int(cur.lastrowid)

    def peek(self, n: int, after_id: int = 0) -> list[Message]:
        """The oldest n messages with id > after_id, oldest first; they stay until ack()."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload, qos, retain, created_at, properties FROM messages"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, n),
            ).fetchall()
        return [
            Message(id=r[0], kind=r[1], topic=r[2], payload=bytes(r[3]), qos=r[4], retain=bool(r[5]),
                    created_at=r[6], properties=json.loads(r[7]))
            for r in rows
        ]

    def ack(self, id: int) -> bool:
        """Delete a delivered message; False if it was already gone (acked or dropped)."""
        with self._lock:
            if self._closed:
                return False
            row = self._db.execute("SELECT size FROM messages WHERE id = ?", (id,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM messages WHERE id = ?", (id,))
            self._depth -= 1
            self._bytes -= int(row[0])
            return True

    def depth(self) -> int:
        return self._depth

    def bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped or refused for lack of room since open, by kind."""
        with self._lock:
            return dict(self._dropped)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def _shrink_wal(self) -> None:
        # The WAL grows with every write until a checkpoint; on a nearly full disk, give its space
        # back so that it goes to verdicts.
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as e:
            logger.debug("outbox checkpoint on a full disk failed: %s", e)

    def _disk_low(self, size: int) -> bool:
        try:
            return shutil.disk_usage(self.dir).free - size < MIN_FREE_BYTES
        except OSError:
            return False  # cannot tell; the insert itself will say if the disk is full

    def _drop_oldest(self, kind: str | None) -> bool:
        if kind is None:
            row = self._db.execute("SELECT id, kind, size FROM messages ORDER BY id LIMIT 1").fetchone()
        else:
            row = self._db.execute(
                "SELECT id, kind, size FROM messages WHERE kind = ? ORDER BY id LIMIT 1", (kind,)
            ).fetchone()
        if row is None:
            return False
        self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
        self._depth -= 1
        self._bytes -= int(row[2])
        self._count_drop(row[1], "outbox full")
        return True

    def _count_drop(self, kind: str, why: str) -> None:
        self._dropped[kind] += 1
        if kind == EXPENDABLE_KIND:
            # The first heatmap drop is the early alarm: verdicts are next if nothing changes.
            level = logging.WARNING if self._dropped[kind] == 1 else logging.DEBUG
            logger.log(level, "dropped a %s to keep room for verdicts: %s", kind, why)
        else:
            logger.error(
                "dropped a %s: %s (max %d bytes); the broker has been unreachable too long or outbox.max_mb is too small",
                kind, why, self.max_bytes,
            )
