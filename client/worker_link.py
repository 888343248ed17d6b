"""The link between a message's ClientApp process and the site worker (client/site_worker.py starts one).

The ClientApp side: `connect` to the worker's Unix socket in the site directory (None when nobody listens) and
`forward` a message and its context, getting the reply and the context state back. The worker side:
`SiteWorker` listens, checks each peer, answers one message at a time with the app's own handlers.
Frames are length-prefixed; the message and context travel as Flower's own protobufs.

Who may talk to it: the socket is created with mode 0600 in a 0700 folder of the site directory, and every
connection's peer must run under the worker's own user id (SO_PEERCRED); anything else is closed unanswered.
The worker answers only for its own site directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from flwr.common import serde
from flwr.proto.message_pb2 import Context as ContextProto
from flwr.proto.message_pb2 import Message as MessageProto

SOCKET_NAME = Path("run") / "site-worker.sock"  # under the site directory
_LEN = struct.Struct(">Q")
_OK, _ERROR = b"K", b"E"
REQUEST_TIMEOUT_S = 60.0  # for a peer to send its whole request; the handler itself may take as long as it needs
MAX_FRAME = 1 << 31


def socket_path(site_dir: Path | str) -> Path:
    return Path(site_dir) / SOCKET_NAME


class WorkerGone(RuntimeError):
    """The worker closed the connection before answering (it died or refused the peer)."""


# -- the wire: length-prefixed frames ------------------------------------------------------------------------

def _send(conn: socket.socket, *parts: bytes) -> None:
    conn.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerGone("connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes refused")
    return _recv_exact(conn, n)


def _send_task(conn: socket.socket, *head: bytes, message, context) -> None:
    """A message and its context as Flower's protobufs, after any `head` frames (the worker's status)."""
    _send(conn, *head, serde.message_to_proto(message).SerializeToString(),
          serde.context_to_proto(context).SerializeToString())


def _recv_task(conn: socket.socket):
    message = serde.message_from_proto(MessageProto.FromString(_recv(conn)))
    return message, serde.context_from_proto(ContextProto.FromString(_recv(conn)))


@contextlib.contextmanager
def _addressable(path: Path):
    """A path short enough for a Unix socket address (108 bytes): the real one, or the same file reached through
    an open descriptor of its folder (deep pytest and site paths are longer)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- the ClientApp's side ----------------------------------------------------------------------------------

def connect(site_dir: Path | str) -> socket.socket | None:
    """A connection to the site's worker, or None when none is listening (no socket, or a stale one)."""
    path = socket_path(site_dir)
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(path) as address:
            conn.connect(address)
    except OSError:
        conn.close()
        return None
    return conn


def forward(conn: socket.socket, message, context):
    """Send one message and its context; return the worker's reply and copy its context state back into
    `context` (SecAgg+ keeps its round state there, and the SuperNode stores what the ClientApp leaves)."""
    with conn:
        _send_task(conn, message=message, context=context)
        if _recv(conn) == _ERROR:
            raise RuntimeError(f"site worker: {_recv(conn).decode(errors='replace')}")
        reply, answered = _recv_task(conn)
    context.state = answered.state
    return reply


# -- the worker's side ------------------------------------------------------------------------------------

class SiteWorker:
    """Answers messages for one site directory with `app`'s handlers, one at a time, until stopped."""

    def __init__(self, site_dir: Path, app, *, on_new_run=None, log=None):
        self.site_dir = Path(site_dir).resolve()
        self.app = app  # the ClientApp whose handlers answer, in this process
        self.on_new_run = on_new_run or (lambda: None)
        self.log = log or (lambda text: print(f"site worker: {text}", file=sys.stderr, flush=True))
        self.path = socket_path(self.site_dir)
        self.answered = 0
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._run_id: int | None = None
        self.one_at_a_time = threading.Lock()  # held while a message is answered (and while the worker warms up)

    def listen(self) -> "SiteWorker":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.path.unlink(missing_ok=True)  # a socket left by a worker that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user may connect
        try:
            with _addressable(self.path) as address:
                listener.bind(address)
        finally:
            os.umask(old_umask)
        listener.listen(8)
        listener.settimeout(1.0)  # wakes up to notice a stop or a dead parent
        self._listener = listener
        return self

    def serve_forever(self, parent_pid: int | None = None) -> None:
        self.log(f"answering for {self.site_dir} on {self.path}")
        try:
            while not self._stop.is_set():
                if parent_pid is not None and os.getppid() != parent_pid:
                    self.log("its SuperNode is gone; stopping")
                    break
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                with conn:
                    self.answer(conn)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    def answer(self, conn: socket.socket) -> None:
        """One connection: one message in, its reply (or the reason there is none) out."""
        if not self._same_user(conn):
            self.log("a connection from another user id was closed unanswered")
            return
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            message, context = _recv_task(conn)
        except Exception as exc:  # a malformed or cut request: say why, keep serving
            self.log(f"a malformed request was refused: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                _send(conn, _ERROR, f"malformed request: {type(exc).__name__}".encode())
            return
        conn.settimeout(None)
        try:
            reply = self.handle(message, context)
        except Exception as exc:  # the ClientApp raises it again, so Flower sends its error reply as before
            with contextlib.suppress(OSError):
                _send(conn, _ERROR, f"{type(exc).__name__}: {exc}".encode())
            return
        with contextlib.suppress(OSError):
            _send_task(conn, _OK, message=reply, context=context)

    def handle(self, message, context):
        """Answer one message with the app's handlers (its context state updated in place), for this site only.
        Both ways a message reaches the worker come here: forwarded over the socket, or taken as a task from the
        SuperNode (client/task_taker.py); one at a time, as a SuperNode sends them."""
        started = time.monotonic()
        kind = message.metadata.message_type
        with self.one_at_a_time:
            try:
                self._check_site(context)
                self._forget_other_runs(context.run_id)
                reply = self.app(message, context)
            except Exception as exc:
                self.log(f"{kind} raised {type(exc).__name__}: {exc}")
                raise
            self.answered += 1
        self.log(f"{kind} answered in {time.monotonic() - started:.1f} s")
        return reply

    def _same_user(self, conn: socket.socket) -> bool:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
        return uid == os.getuid()

    def _check_site(self, context) -> None:
        asked = context.node_config.get("site-dir")
        if asked is None or Path(str(asked)).resolve() != self.site_dir:
            raise RuntimeError(f"this worker answers for {self.site_dir}, not for {asked}")

    def _forget_other_runs(self, run_id: int) -> None:
        # The ClientApp keeps each run's loaded site; a worker that lives across runs keeps only the current one.
        if self._run_id is not None and run_id != self._run_id:
            self.on_new_run()
        self._run_id = run_id
