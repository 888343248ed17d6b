"""Read a site's export directory file by file, so memory does not grow with the number of files.

Accepted: ``*.json`` (one Bundle), ``*.ndjson`` (one Bundle per line), ``*.csv`` (event table),
each optionally gzipped. Everything rejected is kept in ``quarantined`` with file and reason.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pmlm.client.ingest.csv_events import iter_csv_timelines
from pmlm.client.ingest.deidentify import NoteText
from pmlm.client.ingest.fhir import bundle_timelines, decode_json
from pmlm.common.schema import Quarantine, Timeline

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024  # a Synthea bundle is ~3 MB; far larger is not one patient
SUFFIXES = (".json", ".ndjson", ".csv")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def list_record_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file() and _kind(p) and not p.name.startswith(".")]
    return sorted(files)


@dataclass
class RecordReader:
    """Iterate timelines of every patient under ``root``; ``quarantined`` fills as you go. ``note_text=False``:
    notes come without their text (value None), which skips scrubbing it, the costliest step of reading CSV,
    for readers that only build examples (they never carry note text); a function of her timeline keeps the text
    of only the notes it names (deidentify.NoteText), e.g. those a prompt can show."""

    root: Path
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    note_text: NoteText = True
    quarantined: list[Quarantine] = field(default_factory=list)
    files_read: int = 0

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.exists():
            raise FileNotFoundError(f"no such file or directory: {self.root}")

    def __iter__(self) -> Iterator[Timeline]:
        seen: set[str] = set()
        for path in list_record_files(self.root):
            self.files_read += 1
            for timeline in self._read_file(path):
                if timeline.patient_id in seen:
                    self.quarantined.append(Quarantine(str(path), "patient id already read from another file",
                                                       f"Patient/{timeline.patient_id}"))
                    continue
                seen.add(timeline.patient_id)
                yield timeline

    def _open(self, path: Path):
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")

    def _read_file(self, path: Path) -> Iterator[Timeline]:
        source = str(path)
        kind = _kind(path)
        try:
            if kind == "csv":
                with self._open(path) as stream:
                    yield from iter_csv_timelines(stream, source, self.quarantined, self.note_text)
            elif kind == "ndjson":
                with self._open(path) as stream:
                    blank = True
                    for lineno, line in enumerate(stream, 1):
                        if len(line) > self.max_file_bytes:
                            self.quarantined.append(Quarantine(source, _too_large(len(line), self.max_file_bytes),
                                                               f"line {lineno}"))
                            blank = False
                        elif line.strip():
                            blank = False
                            yield from self._bundle(line, source, f"line {lineno}")
                if blank:
                    self.quarantined.append(Quarantine(source, "empty file"))
            else:
                size = os.path.getsize(path)
                if size > self.max_file_bytes:
                    self.quarantined.append(Quarantine(source, _too_large(size, self.max_file_bytes)))
                    return
                with self._open(path) as stream:
                    raw = stream.read(self.max_file_bytes + 1)
                if len(raw) > self.max_file_bytes:  # a gzip that inflates past the limit
                    self.quarantined.append(Quarantine(source, _too_large(len(raw), self.max_file_bytes)))
                    return
                yield from self._bundle(raw, source, "")
        except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a gzip whose data is corrupt
            self.quarantined.append(Quarantine(source, f"unreadable file: {exc}"))

    def _bundle(self, raw: bytes, source: str, where: str) -> Iterator[Timeline]:
        doc = decode_json(raw, source, where)
        if isinstance(doc, Quarantine):
            self.quarantined.append(doc)
            return
        timelines, bad = bundle_timelines(doc, source, self.note_text)
        for q in bad:
            if where and not q.resource:
                q.resource = where
        self.quarantined.extend(bad)
        yield from timelines


def _too_large(size: int, limit: int) -> str:
    return f"file of {size / 2**20:.1f} MiB exceeds the {limit / 2**20:.0f} MiB limit for one bundle"
