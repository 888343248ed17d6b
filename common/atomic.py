"""Durable writes: a crash or a full disk never leaves a torn artifact, manifest, report or ledger line.

``write_atomic`` replaces a whole file: the bytes go to a temporary file in the same directory, are
fsynced, and the temporary file is renamed over the target (then the directory is fsynced), so
readers see the old file or the new one, never a mix. ``append_durably`` adds bytes to an
append-only file (a JSON-lines ledger) and, if the disk refuses them half-way, cuts the file back
to where it was, so no torn last line is left for the next reader.

Both write through ``os.write`` on a raw descriptor, so a test can fail them after N bytes.
"""

from __future__ import annotations

import errno as errno_codes
import os
import secrets
from pathlib import Path


class DurableWriteError(OSError):
    """A write failed (disk full, I/O error); the message names the file and what was left as it was."""


def write_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None,
                 exclusive: bool = False) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` all at once; returns the path.

    mode: permission bits of the new file (e.g. 0o600 for keys); by default an existing file keeps
    its mode and a new one gets the usual umask-based mode. exclusive: fail with FileExistsError
    instead of replacing a file that is already there (create-once, e.g. a private key).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None and path.exists():
        mode = path.stat().st_mode & 0o7777
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # the umask may have taken bits the caller asked for
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # fails if the target exists: an atomic create-once
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            kept = "the previous version is unchanged" if path.exists() else "no file was created"
            raise DurableWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; {kept}") from exc
        raise
    _fsync_directory(path.parent)
    return path


def append_durably(path: str | os.PathLike, data: bytes, *, create_mode: int | None = None) -> int:
    """Append ``data`` to ``path`` with one fsync; returns the file's new size.

    The caller must hold the file's lock (nobody else appends meanwhile). If the write or the fsync
    fails, the file is truncated back to its previous size before the error is raised, so it ends
    where the last complete append ended. create_mode: create a missing file with these permissions
    (otherwise a missing file is an error).
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create_mode is not None else 0)
    fd = os.open(path, flags, 0o644 if create_mode is None else create_mode)
    try:
        before = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            raise DurableWriteError(exc.errno, f"cannot append to {path}: {exc.strerror or exc}; "
                                               f"{_cut_back(fd, before)}") from exc
        return before + len(data)
    finally:
        os.close(fd)


def _cut_back(fd: int, size: int) -> str:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:  # readers still detect the torn tail (e.g. LedgerReplay)
        return f"removing the partial write failed too ({exc.strerror or exc}): its last line is torn"
    return "the partial write was removed; the file ends with its last complete entry"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:  # no progress and no error: do not spin
            raise OSError(errno_codes.EIO, "the write made no progress")
        view = view[written:]


def _fsync_directory(folder: Path) -> None:
    # The rename is durable only once the directory entry is; some file systems refuse, which is harmless.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
