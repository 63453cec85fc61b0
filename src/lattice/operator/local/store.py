"""TrainingJobs and their events in SQLite: what survives a restart of `lattice up`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
MAX_EVENTS_PER_JOB = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job);
"""


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """A tiny object store: one row per TrainingJob (the whole object as JSON), plus events."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def apply(self, obj: Obj) -> tuple[Obj, str]:
        """Create or update a job from a user's document; returns it and created|configured|
        unchanged. Updates keep uid, creation time and status; a changed spec bumps generation."""
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        with self._lock:
            current = self._get(key)
            if current is None:
                meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now_text())
                obj.pop("status", None)
                self._put(key, obj)
                return obj, "created"
            same = (
                current["spec"] == obj["spec"]
                and current["apiVersion"] == obj["apiVersion"]
                and (current["metadata"].get("labels") or {}) == (meta.get("labels") or {})
            )
            if same:
                return current, "unchanged"
            cmeta = current["metadata"]
            meta.update(
                uid=cmeta["uid"],
                creationTimestamp=cmeta["creationTimestamp"],
                generation=int(cmeta.get("generation") or 1) + (current["spec"] != obj["spec"]),
            )
            if "status" in current:
                obj["status"] = current["status"]
            self._put(key, obj)
            return obj, "configured"

    def _get(self, key: str) -> Obj | None:
        row = self._db.execute("SELECT object FROM jobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _put(self, key: str, obj: Obj) -> None:
        self._db.execute(
            "INSERT INTO jobs(key, object) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET object = excluded.object",
            (key, json.dumps(obj)),
        )

    def get(self, key: str) -> Obj | None:
        with self._lock:
            return self._get(key)

    def jobs(self) -> list[tuple[Obj, bool]]:
        """Every job, oldest first, with whether it is being deleted."""
        with self._lock:
            rows = self._db.execute("SELECT object, deleting FROM jobs ORDER BY rowid").fetchall()
        return [(json.loads(o), bool(d)) for o, d in rows]

    def set_status(self, key: str, status: Obj) -> None:
        with self._lock:
            current = self._get(key)
            if current is not None:
                current["status"] = status
                self._put(key, current)

    def mark_deleting(self, key: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET deleting = 1 WHERE key = ?", (key,))
            return cur.rowcount > 0

    def remove(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE key = ?", (key,))
            self._db.execute("DELETE FROM events WHERE job = ?", (key,))

    def add_event(self, key: str, type_: str, reason: str, message: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO events(job, time, type, reason, message) VALUES(?, ?, ?, ?, ?)",
                (key, time.time(), type_, reason, message),
            )
            self._db.execute(
                "DELETE FROM events WHERE job = ? AND id NOT IN "
                "(SELECT id FROM events WHERE job = ? ORDER BY id DESC LIMIT ?)",
                (key, key, MAX_EVENTS_PER_JOB),
            )

    def events(self, key: str) -> list[Obj]:
        with self._lock:
            rows = self._db.execute(
                "SELECT time, type, reason, message FROM events WHERE job = ? ORDER BY id",
                (key,),
            ).fetchall()
        return [{"time": t, "type": ty, "reason": r, "message": m} for t, ty, r, m in rows]
