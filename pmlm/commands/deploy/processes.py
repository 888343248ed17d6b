"""Long-running processes started by `pmlm deploy local`, each stopped by its own PID.

Every process starts in a new session, so its PID is also the group id of the helpers it spawns
(Flower's SuperExec, ServerApp and ClientApp processes); stopping signals that group, waits, and
kills what is left. `stop_all` runs on normal exit, on exceptions (callers use try/finally), at
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
