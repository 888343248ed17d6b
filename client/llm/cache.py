"""On-disk cache of LLM answers, keyed by a SHA-256 over (endpoint, model, messages, sampling).

SQLite (stdlib) rather than one file per key: the refiner makes 10^4-10^5 calls, a commit is atomic
(a crash never leaves a half-written entry) and WAL mode lets several processes of one site share it.
The file is only created by the first ``put``: a run that never got an answer leaves nothing behind.
Answers may quote patient facts, so the directory is 0700 and the database 0600: keep it in the
site's own directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping

CACHE_FILENAME = "llm_responses.sqlite"
_SCHEMA = "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"


def cache_key(request: Mapping[str, Any]) -> str:
    """SHA-256 of the request in canonical JSON (sorted keys), so equal requests give equal keys."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / CACHE_FILENAME
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection shared by the client's threads

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if not self.path.exists():
            if not create:
                return None
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # SQLite keeps these permissions
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(_SCHEMA)
        self._conn = conn
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            conn = self._connect(create=False)
            if conn is None:
                return None
            row = conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        encoded = json.dumps(value, ensure_ascii=False)
        with self._lock:
            conn = self._connect(create=True)
            with conn:  # one transaction: the row is there completely or not at all
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, encoded, time.time()))

    def __len__(self) -> int:
        with self._lock:
            conn = self._connect(create=False)
            return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] if conn else 0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
