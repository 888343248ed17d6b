"""On-disk cache of LLM answers, keyed by a SHA-256 over (model identity, messages, sampling).

A site keeps it at SITE_DIR/llm_cache/ (common/site_layout.py; ``site_llm_config`` in endpoint.py points
the site's LLM client there). What names the model in a key: for the embedded server its GGUF file's name
and SHA-256 digest plus the llama.cpp version (local_server.py), so a swapped model file never answers from
another model's entries; for any other endpoint its URL and the model name the site configured. Only
deterministic requests are cached (temperature 0, or a fixed seed): the embedded server evaluates every
prompt afresh, so the same request gets the same answer (llama_server_child.py), and caching a random
sample would silently return the same "sample" every time.

SQLite (stdlib) rather than one file per key: the refiner makes thousands of calls, a commit is atomic
(a crash never leaves a half-written entry, the guarantee common/atomic.py gives whole files) and WAL mode
lets several processes of one site share it. The file is only created by the first ``put``: a run that
never got an answer leaves nothing behind. It holds at most ``max_entries`` answers (the oldest go first).
A damaged entry or database is a miss, logged once, never an error: the answer is asked again, and an
unreadable database is moved aside (``*.corrupt-TIME``) for a fresh one. Answers may quote patient facts,
so the directory is 0700 and the database 0600, and nothing in it is ever sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping

CACHE_FILENAME = "llm_responses.sqlite"
DEFAULT_MAX_ENTRIES = 100_000  # ~1-2 kB an answer: a few hundred MB at most
_PRUNE_EVERY = 256  # puts between two checks of the size bound
_SCHEMA = "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
# What a stored answer must hold to be used (endpoint.py's Completion fields, less the per-call ones).
ENTRY_FIELDS = {"text": str, "prompt_tokens": int, "completion_tokens": int, "model": str}

log = logging.getLogger(__name__)


def cache_key(request: Mapping[str, Any]) -> str:
    """SHA-256 of the request in canonical JSON (sorted keys), so equal requests give equal keys."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def valid_entry(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), t) for k, t in ENTRY_FIELDS.items()) \
        and isinstance(value.get("finish_reason"), (str, type(None)))


class ResponseCache:
    def __init__(self, directory: str | os.PathLike, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.path = Path(directory) / CACHE_FILENAME
        self.max_entries = max_entries
        self.damaged = 0  # entries or databases found unreadable (each was a miss)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection shared by the client's threads
        self._puts = 0

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if not self.path.exists():
            if not create:
                return None
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # SQLite keeps these permissions
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _set_aside(self, exc: Exception) -> None:
        """An unreadable database (not SQLite, torn, wrong schema): move it aside so the next put starts afresh."""
        self.damaged += 1
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        except OSError:
            aside = None
        log.warning("LLM response cache %s is unreadable (%s): treated as empty%s", self.path, exc,
                    f", the damaged file kept as {aside.name}" if aside else "")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            try:
                conn = self._connect(create=False)
                if conn is None:
                    return None
                row = conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)
                return None
            if row is None:
                return None
            try:
                value = json.loads(row[0])
            except (TypeError, ValueError):
                value = None
            if not valid_entry(value):  # a damaged entry: a miss, and the fresh answer replaces it
                self.damaged += 1
                log.warning("LLM response cache %s: entry %s… is damaged; asking the LLM again", self.path, key[:12])
                return None
            return {k: value.get(k) for k in (*ENTRY_FIELDS, "finish_reason")}

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        encoded = json.dumps(value, ensure_ascii=False)
        with self._lock:
            for attempt in range(2):  # a damaged database is set aside once and the answer kept in a fresh one
                try:
                    conn = self._connect(create=True)
                    with conn:  # one transaction: the row is there completely or not at all
                        conn.execute("BEGIN IMMEDIATE")
                        conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, encoded, time.time()))
                    break
                except sqlite3.DatabaseError as exc:
                    if attempt == 1:
                        log.warning("LLM response cache %s: answer not kept (%s)", self.path, exc)
                        return
                    self._set_aside(exc)
            self._puts += 1
            if self._puts % _PRUNE_EVERY == 0:
                self._prune(conn)

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Keep the newest max_entries answers."""
        try:
            count = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            if count > self.max_entries:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("DELETE FROM responses WHERE key IN (SELECT key FROM responses ORDER BY created "
                                 "LIMIT ?)", (count - self.max_entries,))
        except sqlite3.DatabaseError as exc:
            log.warning("LLM response cache %s: could not prune (%s)", self.path, exc)

    def __len__(self) -> int:
        with self._lock:
            try:
                conn = self._connect(create=False)
                return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] if conn else 0
            except sqlite3.DatabaseError:
                return 0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
