"""The site's per-patient access log: who asked `pmlm serve` for what, allowed or not.

Every call to the site's gRPC services adds one JSON line to SITE_DIR/audit/access_log.jsonl, appended
under an exclusive lock and fsynced before the call's answer leaves (unary calls; a stream's line is
written when the stream ends)::

    time      UTC, when the call ended
    caller    the client certificate's subject (RFC 4514), or "" for an unauthenticated loopback caller
    rpc       the full method name, e.g. /pmlm.v1.PromptService/AssemblePrompt
    patient   the patient id the request named, or "" when it named none
    outcome   the gRPC status code's name: OK, PERMISSION_DENIED, NOT_FOUND, ...
    detail    why, for a call that did not succeed (omitted on OK)

Refused callers are logged as well as served ones: the log answers "who looked at this patient, and who
tried". The file is only appended to; `pmlm audit access SITE_DIR [--patient ID]` reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from pmlm.common.atomic import append_durably
from pmlm.common.site_layout import ACCESS_LOG

MAX_DETAIL = 300  # characters of a status message kept; enough to say why, not to copy a record
FIELDS = ("time", "caller", "rpc", "patient", "outcome")


def access_log_path(site_dir: Path) -> Path:
    return Path(site_dir) / ACCESS_LOG


class AccessLog:
    """Appends one line per call; safe across the server's worker threads and across processes."""

    def __init__(self, site_dir: Path):
        self.path = access_log_path(site_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def record(self, caller: str, rpc: str, patient: str, outcome: str, detail: str = "") -> dict:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "caller": caller,
                 "rpc": rpc, "patient": patient, "outcome": outcome}
        if detail:
            entry["detail"] = detail[:MAX_DETAIL]
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            # The lock file, not the log, carries the flock: append_durably opens the log itself.
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                append_durably(self.path, line, create_mode=0o600)
            finally:
                os.close(fd)
        return entry


def read_access_log(site_dir: Path, patient: str | None = None) -> tuple[list[dict], list[str]]:
    """The log's entries (only those naming `patient`, when given) and the lines that could not be read."""
    path = access_log_path(site_dir)
    entries, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                problems.append(f"{path}:{number}: not JSON ({exc})")
                continue
            if not isinstance(entry, dict) or any(key not in entry for key in FIELDS):
                problems.append(f"{path}:{number}: lacks one of {', '.join(FIELDS)}")
                continue
            if patient is None or entry["patient"] == patient:
                entries.append(entry)
    return entries, problems
