"""A flat CSV event table -> timelines.

Columns: ``patient_id,time,kind,system,code,display,value,unit`` and optionally ``end`` and
``encounter_class``. A row of kind ``patient`` carries the birth date in ``time`` and the
gender in ``code``. Bad rows are quarantined with their line number; good rows go through.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from functools import lru_cache
from typing import IO, Iterator

from pmlm.client.ingest.deidentify import NoteText, Scrubber, scrub_notes
from pmlm.client.ingest.fhir import ResourceError, parse_fhir_datetime
from pmlm.common.schema import EVENT_KINDS, IDENTIFYING_OBSERVATIONS, Event, Quarantine, Timeline

# An event table names no people: its notes lose what the identifying patterns find (dates, phones,
# addresses, names after a title or a relation word); names only a FHIR record lists are removed there.
_SCRUB_NOTE = Scrubber()

REQUIRED_COLUMNS = ("patient_id", "time", "kind", "system", "code", "display", "value", "unit")
OPTIONAL_COLUMNS = ("end", "encounter_class")
ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

# The csv module's default field limit (128 Ki characters) is shorter than a long clinical note, and past
# it the reader loses its place inside the quoted field and misreads the rows after it. The limit is
# process-wide; raising it only lets longer fields through.
MAX_FIELD_CHARS = 64 * 2**20
if csv.field_size_limit() < MAX_FIELD_CHARS:
    csv.field_size_limit(MAX_FIELD_CHARS)


# An encounter's rows share its timestamp: each distinct text is parsed once (a bad one raises each time).
_parse_time = lru_cache(maxsize=1 << 12)(parse_fhir_datetime)


def _row_event(row: dict) -> Event:
    kind = row["kind"]
    if kind not in EVENT_KINDS:
        raise ResourceError(f"unknown kind {kind!r}")
    if not row["code"].strip():
        raise ResourceError("empty code")
    when = _parse_time(row["time"])
    end = _parse_time(row["end"]) if row.get("end") else None
    raw = row["value"]
    value: float | str | None = None
    if raw != "":
        if kind == "observation" and row["unit"]:
            try:
                value = float(raw)
            except ValueError:
                raise ResourceError(f"value {raw!r:.40} is not numeric but has unit {row['unit']!r:.40}") from None
            if not math.isfinite(value):  # "nan", "inf" and "1e999" parse as floats but are no measurement
                raise ResourceError(f"value {raw!r:.40} is not finite")
        else:
            value = raw  # a note is scrubbed when its patient is handed out (iter_csv_timelines)
    return Event(when, kind, row["system"], row["code"], row["display"], value, row["unit"], end,
                 row.get("encounter_class") or "")


def iter_csv_timelines(stream: IO[bytes], source: str, quarantined: list[Quarantine],
                       note_text: NoteText = True) -> Iterator[Timeline]:
    """Yield one timeline per patient; a patient's rows need not be contiguous. ``note_text=False`` drops the text
    of notes (value None) for readers that only build examples: nothing to scrub, and nothing unscrubbed kept; a
    function keeps only the notes it names (deidentify.NoteText)."""
    # Undecodable bytes become lone surrogates, so one bad row is quarantined and the rows after it still count.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, [])
    except csv.Error as exc:
        quarantined.append(Quarantine(source, f"malformed CSV header: {exc}"))
        return
    if not header:
        quarantined.append(Quarantine(source, "empty file"))
        return
    if not _is_utf8(header):
        quarantined.append(Quarantine(source, "not UTF-8 text (in the header)"))
        return
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        quarantined.append(Quarantine(source, f"CSV header lacks columns {missing}"))
        return
    # A row may stop before optional columns (they read as absent) but not before a required one, nor run past the
    # header (csv.DictReader's reading of the same rows, without a dict per row until the row is known good).
    shortest = max(header.index(c) for c in REQUIRED_COLUMNS) + 1
    timelines: dict[str, Timeline] = {}
    for line, values in _rows(reader, source, quarantined):
        if not shortest <= len(values) <= len(header):
            quarantined.append(Quarantine(source, "row has the wrong number of fields", line))
            continue
        if not _is_utf8(values):
            quarantined.append(Quarantine(source, "row is not UTF-8 text", line))
            continue
        row = dict(zip(header, values))
        pid = row["patient_id"].strip()
        if not pid:
            quarantined.append(Quarantine(source, "empty patient_id", line))
            continue
        timeline = timelines.setdefault(pid, Timeline(pid, source=source))
        try:
            if row["kind"] == "patient":
                timeline.birth_date = parse_fhir_datetime(row["time"]) if row["time"] else None
                timeline.gender = row["code"]
            else:
                event = _row_event(row)
                if event.concept not in IDENTIFYING_OBSERVATIONS:
                    timeline.events.append(event)
        except ResourceError as exc:
            quarantined.append(Quarantine(source, str(exc), line))
    # Scrubbing is the costliest step of reading (most of a hospital's 20 s), so it waits until a patient is
    # asked for: nothing unscrubbed leaves this function, and a reader that stops early pays only for whom it took.
    for timeline in timelines.values():
        yield scrub_notes(timeline.sort(), _SCRUB_NOTE, note_text)


def _rows(reader, source: str, quarantined: list[Quarantine]) -> Iterator[tuple[str, list[str]]]:
    """(line label, fields) for each non-blank row; a row the csv module rejects (e.g. an oversized field) is
    quarantined and reading goes on with the next one."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            quarantined.append(Quarantine(source, f"malformed CSV row: {exc}", f"line {reader.line_num}"))
            continue
        if row:
            yield f"line {reader.line_num}", row


def _is_utf8(values) -> bool:
    # Undecodable bytes were read as lone surrogates (surrogateescape); an ASCII row has none.
    joined = "".join(values)
    if joined.isascii():
        return True
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_csv_timelines(timelines, stream: IO[str]) -> int:
    """Write timelines as the flat event table (the sample consortium's storage format)."""
    # A bare "\r" is a line break to the reader but is not quoted by the writer when rows end in "\n":
    # line breaks inside values (notes) are written as "\n", which the writer does quote.
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(ALL_COLUMNS)
    rows = 0
    for t in timelines:
        birth = t.birth_date.date().isoformat() if t.birth_date else ""
        writer.writerow(newlines_as_lf([t.patient_id, birth, "patient", "", t.gender, "", "", "", "", ""]))
        for e in t.events:
            value = "" if e.value is None else (repr(e.value) if isinstance(e.value, float) else e.value)
            if isinstance(e.value, float) and e.value.is_integer():
                value = str(int(e.value))
            writer.writerow(newlines_as_lf([t.patient_id, _iso(e.time), e.kind, e.system, e.code, e.display, value,
                                            e.unit, _iso(e.end) if e.end else "", e.encounter_class]))
            rows += 1
    return rows


def gzipped_event_table(timelines) -> tuple[bytes, int]:
    """The event table of `timelines`, gzipped byte-reproducibly (no file name, mtime 0), and its row count."""
    text = io.StringIO()
    rows = write_csv_timelines(timelines, text)
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.getvalue().encode("utf-8"))
    return packed.getvalue(), rows


def newlines_as_lf(row: list[str]) -> list[str]:
    return [v.replace("\r\n", "\n").replace("\r", "\n") for v in row]


def _iso(dt) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
