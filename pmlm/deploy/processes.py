"""Long-running processes started by `pmlm deploy local`, each stopped by its own PID.

Every process starts in a new session, so its PID is also the group id of the helpers it spawns
(Flower's SuperExec, ServerApp and ClientApp processes); stopping signals that group, waits, and
kills what is left. The SuperLink starts its SuperExec detached (a session of its own), so the
descendants are also found by parent PID before the stop and killed and waited for one by one. `stop_all` runs on normal exit, on exceptions (callers use try/finally), at
interpreter exit and on SIGTERM.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 10.0


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class ProcessSet:
    def __init__(self):
        self.started: list[Started] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            self._previous_sigterm = None

    def _on_sigterm(self, signum, frame):
        raise SystemExit(128 + signum)  # unwinds through the callers' finally blocks, which stop everything

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Started:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=cwd, start_new_session=True)
        started = Started(name, process, log)
        with self._lock:
            self.started.append(started)
        return started

    def stop(self, started: Started) -> int | None:
        process = started.process
        descendants = descendants_of(process.pid)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # Helpers may outlive their parent; the group is still addressed by our child's PID, which
        # cannot be reused until we reap it below.
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        for pid in descendants:
            if _is_group_leader(pid):
                _signal_group(pid, signal.SIGKILL)
            else:
                _signal(pid, signal.SIGKILL)
        _wait_gone(descendants, STOP_GRACE_S)
        return process.returncode

    def stop_all(self) -> None:
        with self._lock:
            started, self.started = list(self.started), []
        for item in reversed(started):  # SuperNodes before the SuperLink they talk to
            self.stop(item)

    def close(self) -> None:
        self.stop_all()
        atexit.unregister(self.stop_all)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def _proc_stat(pid: int) -> list[str] | None:
    """State, parent PID, group id, ... of a live process (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def descendants_of(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _is_group_leader(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and int(fields[2]) == pid


def _wait_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_proc_stat(pid) is not None for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
