"""The coordinator's countersigned copy of the ledger entries sites ship with their releases.

A site's ledger lives at the site; if the site later lost or rewrote it, the coordinator's
copy still shows what the site declared when it released. Each shipped entry is checked
against the site's pinned public key and against what the coordinator already holds (order,
chain, epsilon never decreasing), then wrapped in a record that the coordinator signs with
its own Ed25519 key and appends to a per-site, hash-chained JSON-lines file::

    STATE_DIR/keys/coordinator_ed25519.key(.pub)   the coordinator's key, created on first use
    STATE_DIR/site_keys/<site_id>.pub              each site's pinned public key
    STATE_DIR/ledger_copies/<site_id>.jsonl        one countersigned record per shipped entry

A site's first shipment must start with its ledger's open entry (seq 0): it carries the
budget and accountant settings, so the copy can be re-priced on its own.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pmlm.common.atomic import append_durably, write_atomic
from pmlm.common.privacy.ledger import SITE_ID_PATTERN, LedgerReplay, Problem
from pmlm.common.privacy.signing import (
    COORDINATOR_COPY_DOMAIN,
    GENESIS_PREV_HASH,
    KeyFileError,
    canonical_json,
    key_fingerprint,
    line_hash,
    load_or_create_private_key,
    load_public_key,
    public_key_b64,
    public_key_from_b64,
    sign,
    signature_valid,
)

COPY_FORMAT = "pmlm-ledger-copy/1"
COORDINATOR_KEY_PATH = Path("keys") / "coordinator_ed25519.key"
SITE_KEYS_DIR = Path("site_keys")
COPIES_DIR = Path("ledger_copies")


class CopyRejected(Exception):
    """Shipped entries the coordinator will not countersign; the message names the entry and why."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def verify_site_entries(site_id: str, entries: Iterable[dict[str, Any]], held: LedgerReplay) -> LedgerReplay:
    """Check shipped entries as a continuation of `held` (the replay of the site entries already copied).

    Works on a copy, so a rejected shipment leaves `held` untouched; returns the replay with
    the shipped entries added.
    """
    if held.problems:
        raise CopyRejected(f"the coordinator's own copy for {site_id!r} fails verification: {held.problems[0]}")
    replay = copy.deepcopy(held)
    for entry in entries:
        if not isinstance(entry, dict):
            raise CopyRejected(f"site {site_id!r} shipped a {type(entry).__name__}, not a ledger entry")
        if entry.get("site_id") != site_id:
            raise CopyRejected(f"entry {entry.get('seq')!r} is from site {entry.get('site_id')!r}, not {site_id!r}")
        try:
            line = canonical_json(entry)
        except (TypeError, ValueError) as exc:
            raise CopyRejected(f"entry {entry.get('seq')!r} from {site_id!r} is not plain JSON: {exc}") from None
        if not replay.entries and entry.get("kind") != "open":
            raise CopyRejected(
                f"the first entry the coordinator receives from {site_id!r} must be its ledger's open "
                f"entry (seq 0), got {entry.get('kind')!r} seq {entry.get('seq')!r}"
            )
        known = len(replay.problems)
        replay.feed_line(line)
        if len(replay.problems) > known:
            raise CopyRejected(f"site {site_id!r}: {replay.problems[known]}")
    return replay


class CoordinatorLedgerCopy:
    """The coordinator's per-site copies; `accept` is called with what each site ships."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self._key = load_or_create_private_key(self.state_dir / COORDINATOR_KEY_PATH)
        # site_id -> (copy file size, replay of its site entries, its last line): re-reading and
        # re-pricing a whole copy on every shipment would make a long run quadratic.
        self._held: dict[str, tuple[int, LedgerReplay, bytes | None]] = {}
        (self.state_dir / SITE_KEYS_DIR).mkdir(parents=True, exist_ok=True)
        (self.state_dir / COPIES_DIR).mkdir(parents=True, exist_ok=True)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def public_key_path(self) -> Path:
        return Path(str(self.state_dir / COORDINATOR_KEY_PATH) + ".pub")

    def copy_path(self, site_id: str) -> Path:
        _check_site_id(site_id)
        return self.state_dir / COPIES_DIR / f"{site_id}.jsonl"

    def site_key_path(self, site_id: str) -> Path:
        _check_site_id(site_id)
        return self.state_dir / SITE_KEYS_DIR / f"{site_id}.pub"

    def register_site_key(self, site_id: str, site_key: Ed25519PublicKey) -> None:
        """Pin a site's public key (at enrolment); a different key later is refused, never replaced."""
        path = self.site_key_path(site_id)
        if path.exists():
            if public_key_b64(load_public_key(path)) != public_key_b64(site_key):
                raise CopyRejected(
                    f"site {site_id!r} is pinned to key {key_fingerprint(load_public_key(path))}, "
                    f"not {key_fingerprint(site_key)}"
                )
            return
        write_atomic(path, site_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def site_key(self, site_id: str) -> Ed25519PublicKey | None:
        path = self.site_key_path(site_id)
        return load_public_key(path) if path.exists() else None

    def accept(self, site_id: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Verify `entries` from `site_id`, countersign each and append them to the site's copy.

        A site not yet registered is pinned to the key in its open entry (trust on first use);
        register keys out of band at enrolment to close that window. Raises CopyRejected (and
        stores nothing) if any entry fails; returns the countersigned records.
        """
        entries = list(entries)
        with self._locked(site_id):
            site_key = self.site_key(site_id)
            if site_key is None:
                opening = entries[0] if entries else {}
                if opening.get("kind") != "open":
                    raise CopyRejected(f"site {site_id!r} has no registered key and did not ship its open entry")
                try:
                    site_key = public_key_from_b64(opening.get("public_key"))
                except KeyFileError as exc:
                    raise CopyRejected(f"site {site_id!r}: {exc}") from None
            path = self.copy_path(site_id)
            size = path.stat().st_size if path.exists() else 0
            cached = self._held.get(site_id)
            if cached is not None and cached[0] == size:
                _, held, last_line = cached
            else:
                held, copy_problems, last_line = read_copy(path, self.public_key, site_key)
                if copy_problems:
                    raise CopyRejected(f"the stored copy for {site_id!r} fails verification: {copy_problems[0]}")
            updated = verify_site_entries(site_id, entries, held)
            self.register_site_key(site_id, site_key)
            prev = line_hash(last_line) if last_line is not None else GENESIS_PREV_HASH
            records, data = [], b""
            for index, entry in enumerate(entries, start=len(held.entries)):
                record = {
                    "format": COPY_FORMAT, "seq": index, "site_id": site_id, "received_at": _utc_now(),
                    "site_entry": entry, "prev_hash": prev, "coordinator_key": key_fingerprint(self.public_key),
                }
                record["countersignature"] = sign(self._key, COORDINATOR_COPY_DOMAIN, canonical_json(record))
                line = canonical_json(record)
                prev = line_hash(line)
                records.append(record)
                data += line + b"\n"
            append_durably(path, data, create_mode=0o644)  # a full disk leaves the copy as it was
            if records:
                last_line = data[:-1].rsplit(b"\n", 1)[-1]
            self._held[site_id] = (size + len(data), updated, last_line)
            return records

    @contextmanager
    def _locked(self, site_id: str) -> Iterator[None]:
        with open(self.copy_path(site_id).with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def read_copy(
    path: Path, coordinator_key: Ed25519PublicKey | None, site_key: Ed25519PublicKey | None
) -> tuple[LedgerReplay, list[Problem], bytes | None]:
    """Re-check a copy file: its own chain and countersignatures, then the site entries inside.

    Returns (replay of the site entries, problems, last line). Without `coordinator_key`,
    countersignatures are not checked; without `site_key`, site signatures are checked
    against the key in the copied open entry.
    """
    problems: list[Problem] = []
    replay = LedgerReplay(site_key, allow_gaps=True)
    if not Path(path).exists():
        return replay, problems, None
    data = Path(path).read_bytes()
    *lines, tail = data.split(b"\n")
    prev, last_line = GENESIS_PREV_HASH, None
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            ok_json = isinstance(record, dict)
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(Problem(lineno, None, f"copy record is not valid JSON ({exc})"))
            prev, last_line = line_hash(line), line
            continue
        if not ok_json:
            problems.append(Problem(lineno, None, "copy record is not a JSON object"))
            prev, last_line = line_hash(line), line
            continue
        seq = record.get("seq")
        if seq != lineno - 1:
            problems.append(Problem(lineno, seq, f"copy record number is {seq!r}, expected {lineno - 1}"))
        if canonical_json(record) != line:
            problems.append(Problem(lineno, seq, "bytes differ from the record's canonical form (edited)"))
        if record.get("prev_hash") != prev:
            problems.append(Problem(lineno, seq, "prev_hash does not match the previous copy record"))
        unsigned = {k: v for k, v in record.items() if k != "countersignature"}
        if coordinator_key is not None and not signature_valid(
            coordinator_key, COORDINATOR_COPY_DOMAIN, canonical_json(unsigned), record.get("countersignature")
        ):
            problems.append(Problem(lineno, seq, f"countersignature does not verify with coordinator key "
                                                 f"{key_fingerprint(coordinator_key)}"))
        site_entry = record.get("site_entry")
        if isinstance(site_entry, dict):
            known = len(replay.problems)
            replay.feed_line(canonical_json(site_entry))
            problems.extend(
                Problem(lineno, p.seq, f"site entry: {p.message}") for p in replay.problems[known:]
            )
        else:
            problems.append(Problem(lineno, seq, "record holds no site entry"))
        prev, last_line = line_hash(line), line
    if tail:
        problems.append(Problem(len(lines) + 1, None, f"incomplete last line ({len(tail)} bytes): interrupted write"))
    return replay, problems, last_line


def _check_site_id(site_id: str) -> None:
    if not isinstance(site_id, str) or not SITE_ID_PATTERN.match(site_id):
        raise CopyRejected(f"site_id must match {SITE_ID_PATTERN.pattern}, got {site_id!r}")
