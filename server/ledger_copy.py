"""The coordinator's countersigned copy of the ledger entries sites ship with their releases.

A site's ledger lives at the site; if the site later lost or rewrote it, the coordinator's
copy still shows what the site declared when it released. Each shipped entry is checked
against the site's pinned public key and against what the coordinator already holds (order,
chain, epsilon never decreasing), then wrapped in a record that the coordinator signs with
its own Ed25519 key and appends to a per-site, hash-chained JSON-lines file::

    STATE_DIR/keys/coordinator_ed25519.key(.pub)   the coordinator's key, created on first use
    STATE_DIR/site_keys/<site_id>.pub              each site's pinned public key
    STATE_DIR/ledger_copies/<site_id>.jsonl        one countersigned record per shipped entry
    STATE_DIR/ledger_heads/<site_id>.json          the site's anchored head: seq and hash of the last
                                                   entry held, countersigned (rewritten on every accept)

A site's first shipment must start with its ledger's open entry (seq 0): it carries the
budget and accountant settings, so the copy can be re-priced on its own.

The head is the anchor against truncation: the coordinator asks each site for its entries from the
head on, and the site must still hold that exact entry, with the new ones chained onto it
(`accept_from_head`); an auditor checks a site's ledger against it (`pmlm audit verify --anchors`).
The head also records how many records the copy held, so a copy cut short is caught too.
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
LEDGER_COPIES_DIR = "ledger-copies"  # under the coordinator's workdir: its CoordinatorLedgerCopy state dir
COORDINATOR_KEY_PATH = Path("keys") / "coordinator_ed25519.key"
SITE_KEYS_DIR = Path("site_keys")
COPIES_DIR = Path("ledger_copies")
HEADS_DIR = Path("ledger_heads")
HEAD_FORMAT = "pmlm-ledger-head/1"
# Its own domain tag, so a head's countersignature can never pass for a copy record's, or back.
COORDINATOR_HEAD_DOMAIN = b"pmlm-ledger-head/1\n"


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
        (self.state_dir / HEADS_DIR).mkdir(parents=True, exist_ok=True)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def public_key_path(self) -> Path:
        return Path(str(self.state_dir / COORDINATOR_KEY_PATH) + ".pub")

    def copy_path(self, site_id: str) -> Path:
        _check_site_id(site_id)
        return self.state_dir / COPIES_DIR / f"{site_id}.jsonl"

    def head_path(self, site_id: str) -> Path:
        _check_site_id(site_id)
        return self.state_dir / HEADS_DIR / f"{site_id}.json"

    def sites(self) -> list[str]:
        """Every site the coordinator holds a copy or a head of."""
        names = {p.stem for d in (COPIES_DIR, HEADS_DIR) for p in (self.state_dir / d).glob("*.json*")}
        return sorted(n for n in names if SITE_ID_PATTERN.match(n))

    def head(self, site_id: str) -> dict[str, Any] | None:
        """The site's anchored head ({seq, entry_hash, ...}), None before its first shipment.

        Raises CopyRejected if the copy and its head disagree (the copy was cut short or edited).
        """
        with self._locked(site_id):
            _, held, _ = self._load(site_id, self.site_key(site_id))
            return head_of(site_id, held) if held.entries else None

    def accept_from_head(self, site_id: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Accept what a site sent when asked for its entries from the anchored head on.

        The first entry must be the held head itself, byte for byte (a site whose ledger was truncated
        or rewritten since cannot return it), and the rest must follow it with no gap; before the
        first shipment, the entries must start at the open entry. Returns the countersigned new records.
        """
        entries = list(entries)
        head = self.head(site_id)
        if head is None:
            return self.accept(site_id, entries, contiguous=True)
        first = entries[0] if entries and isinstance(entries[0], dict) else None
        if first is None or first.get("seq") != head["seq"]:
            ends = max((e.get("seq", -1) for e in entries if isinstance(e, dict)), default=None)
            raise CopyRejected(
                f"site {site_id!r} no longer holds entry {head['seq']}, the last one the coordinator anchored "
                f"(it sent {len(entries)} entries, first seq {None if first is None else first.get('seq')!r}, "
                f"last {ends!r}): its ledger was truncated or rewritten")
        if _entry_hash(first) != head["entry_hash"]:
            raise CopyRejected(
                f"site {site_id!r}: its entry {head['seq']} differs from the one the coordinator anchored "
                f"(hash {_entry_hash(first)[:16]}..., anchored {head['entry_hash'][:16]}...): its ledger was "
                f"rewritten")
        return self.accept(site_id, entries[1:], contiguous=True)

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

    def accept(self, site_id: str, entries: list[dict[str, Any]], *, contiguous: bool = False
               ) -> list[dict[str, Any]]:
        """Verify `entries` from `site_id`, countersign each and append them to the site's copy.

        A site not yet registered is pinned to the key in its open entry (trust on first use);
        register keys out of band at enrolment to close that window. Raises CopyRejected (and
        stores nothing) if any entry fails; returns the countersigned records. contiguous: every
        entry must follow the last one held with no gap (a whole ledger is shipped, refusals
        included), so each one's prev_hash chains onto the held head.
        """
        entries = list(entries)
        if not entries:  # nothing new; still (re)anchor the head, e.g. for a copy kept before heads existed
            with self._locked(site_id):
                _, held, last_line = self._load(site_id, self.site_key(site_id))
                if held.entries:
                    self._write_head(site_id, held, last_line)
            return []
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
            size, held, last_line = self._load(site_id, site_key)
            if contiguous:
                _check_contiguous(site_id, entries, held)
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
            # After the copy: a crash in between leaves a head behind the copy, which _load accepts (a
            # head ahead of its copy would mean the copy lost records).
            self._write_head(site_id, updated, last_line)
            return records

    def _load(self, site_id: str, site_key: Ed25519PublicKey | None) -> tuple[int, LedgerReplay, bytes | None]:
        """(copy size, replay of its site entries, its last line), checked against the stored head."""
        path = self.copy_path(site_id)
        size = path.stat().st_size if path.exists() else 0
        cached = self._held.get(site_id)
        if cached is not None and cached[0] == size:
            return cached
        held, copy_problems, last_line = read_copy(path, self.public_key, site_key)
        if copy_problems:
            raise CopyRejected(f"the stored copy for {site_id!r} fails verification: {copy_problems[0]}")
        stored = read_head(self.head_path(site_id), self.public_key)
        if isinstance(stored, str):
            raise CopyRejected(f"the anchored head of {site_id!r} fails verification: {stored}")
        if stored is not None:
            records = len(held.entries)
            if records < stored["copy_records"]:
                raise CopyRejected(
                    f"the coordinator's copy for {site_id!r} holds {records} records but its anchored head says "
                    f"{stored['copy_records']} (up to entry {stored['seq']}): "
                    f"{stored['copy_records'] - records} records are missing from {path}")
            kept = held.entries[stored["copy_records"] - 1] if stored["copy_records"] else None
            if kept is None or kept.get("seq") != stored["seq"] or _entry_hash(kept) != stored["entry_hash"]:
                raise CopyRejected(f"the coordinator's copy for {site_id!r} differs from its anchored head at "
                                   f"entry {stored['seq']}: {path} was rewritten")
        self._held[site_id] = (size, held, last_line)
        return size, held, last_line

    def _write_head(self, site_id: str, held: LedgerReplay, last_line: bytes | None) -> None:
        head = {**head_of(site_id, held), "copy_records": len(held.entries),
                "copy_last_hash": line_hash(last_line) if last_line is not None else None,
                "format": HEAD_FORMAT, "updated_at": _utc_now(), "coordinator_key": key_fingerprint(self.public_key)}
        head["countersignature"] = sign(self._key, COORDINATOR_HEAD_DOMAIN, canonical_json(head))
        write_atomic(self.head_path(site_id), canonical_json(head) + b"\n", mode=0o644)

    @contextmanager
    def _locked(self, site_id: str) -> Iterator[None]:
        with open(self.copy_path(site_id).with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _entry_hash(entry: dict[str, Any]) -> str:
    # Entries are stored as their canonical JSON, so this is the SHA-256 of the line in the site's ledger.
    return line_hash(canonical_json(entry))


def head_of(site_id: str, held: LedgerReplay) -> dict[str, Any]:
    """The head of a replay of a site's entries: seq, hash and signature of the last one, and the site's key."""
    last = held.entries[-1]
    return {"site_id": site_id, "seq": last["seq"], "entry_hash": _entry_hash(last),
            "entry_signature": last.get("signature"),
            "key_fingerprint": (held.genesis or {}).get("key_fingerprint")}


def _check_contiguous(site_id: str, entries: list[dict[str, Any]], held: LedgerReplay) -> None:
    expected = held.entries[-1]["seq"] + 1 if held.entries else 0
    for entry in entries:
        seq = entry.get("seq") if isinstance(entry, dict) else None
        if seq != expected:
            raise CopyRejected(f"site {site_id!r} sent entry {seq!r} where entry {expected} should follow the "
                               f"coordinator's head: entries are missing, repeated or out of order")
        expected += 1


def read_head(path: Path, coordinator_key: Ed25519PublicKey | None) -> dict[str, Any] | str | None:
    """A stored head, None if there is none, or a string saying why it cannot be trusted.

    Without `coordinator_key`, the countersignature is not checked.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{path} is not readable JSON ({exc})"
    if not isinstance(head, dict) or head.get("format") != HEAD_FORMAT:
        return f"{path} is not a {HEAD_FORMAT} record"
    missing = sorted({"site_id", "seq", "entry_hash", "copy_records", "countersignature"} - set(head))
    if missing:
        return f"{path} lacks {missing}"
    unsigned = {k: v for k, v in head.items() if k != "countersignature"}
    if coordinator_key is not None and not signature_valid(
        coordinator_key, COORDINATOR_HEAD_DOMAIN, canonical_json(unsigned), head.get("countersignature")
    ):
        return f"{path}: countersignature does not verify with coordinator key {key_fingerprint(coordinator_key)}"
    return head


def check_against_head(entries: list[dict[str, Any]], head: dict[str, Any]) -> str | None:
    """Why a site ledger's `entries` fail the coordinator's anchored `head`, or None if they hold it."""
    seqs = [e.get("seq") for e in entries if isinstance(e.get("seq"), int)]
    last = max(seqs, default=-1)
    if last < head["seq"]:
        return (f"truncated: the ledger ends at entry {last}, but the coordinator anchored entry {head['seq']} "
                f"on {head.get('updated_at', '?')}: {head['seq'] - last} entries are missing")
    held = next((e for e in entries if e.get("seq") == head["seq"]), None)
    if held is None or _entry_hash(held) != head["entry_hash"]:
        return (f"diverges from the anchored head: entry {head['seq']} is not the one the coordinator "
                f"countersigned (the ledger was rewritten from there or earlier)")
    return None


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
