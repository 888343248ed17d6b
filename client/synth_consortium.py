"""A RESAMPLED consortium for scale tests: many sites built from whole patient timelines of a source cohort.

Nobody new is described: every output patient is a copy of one source patient's whole timeline under a fresh
id, moved back in time by a per-patient number of days, at a site whose care pattern (seeded per site) drops some
visit and procedure types, thins others and repeats others. Quality figures on such a consortium measure nothing
about real-looking data: the same few hundred source timelines recur at every site.

Speed (100 sites x 1,000 patients in minutes): each source timeline is read once into string templates (its CSV
rows with the patient id and the dates as format fields), so writing a patient is formatting a few strings,
and sites are written side by side in worker processes, each streaming its own gzipped table.
"""

from __future__ import annotations

import csv
import gzip
import io
import multiprocessing
import os
import random
import shutil
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from pmlm.client.ingest import list_record_files
from pmlm.client.ingest.csv_events import ALL_COLUMNS, REQUIRED_COLUMNS, newlines_as_lf
from pmlm.client.ingest.fhir import ResourceError, parse_fhir_datetime
from pmlm.client.sites import SAMPLE_DATA
from pmlm.client.synth_provenance import PROVENANCE_TITLE, write_provenance
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import concept_id

MAX_SHIFT_DAYS = 730  # each patient's dates move back 1..730 days (back only: nothing lands after the source's end)
CANDIDATE_VISIT_TYPES = 12  # a site's pattern changes the commonest visit types, so the change shows in its data
VISIT_TYPES_PER_CHANGE = 2  # this many visit types dropped, as many thinned, as many favoured
THINNED_KEEP = 0.5  # a thinned type's visit is kept with this probability
REPEAT_AFTER_DAYS = (7, 28)  # a favoured visit is followed by a repeat visit this many days later
DROPPED_PROCEDURE_SHARE = 0.1  # share of procedure types a site does not perform
GZIP_LEVEL = 3  # a tenth of the text's size at three times the default level's speed

STATE_KINDS = frozenset({"condition", "medication", "immunization"})  # what she has: kept whatever the site does


@dataclass(frozen=True)
class Visit:
    """One encounter and what happened during it (encounter None: rows outside any encounter). Its templates are
    CSV rows with {0} for the patient id and {1}, {2}, ... for `times`."""

    encounter: str | None
    times: tuple[datetime, ...]
    care: str  # the encounter row and its observations, reports, notes: dropped or repeated with the visit
    procedures: tuple[tuple[str, str], ...]  # (concept, row): also subject to the site's dropped procedures
    state: str  # conditions, medications, immunizations: always kept, never repeated
    rows: tuple[int, int]  # rows in care, rows in state


@dataclass(frozen=True)
class SourcePatient:
    birth: date | None
    gender: str
    visits: tuple[Visit, ...]


@dataclass
class Source:
    patients: list[SourcePatient] = field(default_factory=list)
    visit_types: Counter = field(default_factory=Counter)  # encounter concept -> visits
    procedure_types: Counter = field(default_factory=Counter)
    names: dict[str, str] = field(default_factory=dict)  # concept -> its display text
    skipped_rows: int = 0  # rows the reader would quarantine: a wrong number of fields, no readable date


@dataclass(frozen=True)
class CarePattern:
    """How one site's care differs from the source's."""

    dropped_visits: tuple[str, ...]
    thinned_visits: tuple[str, ...]
    favoured_visits: tuple[str, ...]
    dropped_procedures: tuple[str, ...]


def read_source(root: Path) -> Source:
    """Every patient of the event tables under `root` (a consortium or one site), as templates."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such source directory: {root}")
    files = list_record_files(root)
    others = [p for p in files if not p.name.lower().endswith((".csv", ".csv.gz"))]
    if others:
        raise ValueError(f"{root}: synth-consortium resamples event tables (events.csv.gz, as `pmlm data generate` "
                         f"writes them), not {others[0].name}")
    source = Source()
    for path in files:
        for pid_rows in _patient_rows(path, source).values():
            source.patients.append(_source_patient(pid_rows, source))
    if not source.patients:
        raise ValueError(f"{root}: no patients in its event tables")
    return source


def _patient_rows(path: Path, source: Source) -> dict[str, list[list[str]]]:
    """Each patient's rows of one table, as lists in ALL_COLUMNS order (an optional column it lacks: empty)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: not an event table, its header lacks {missing}")
        at = [header.index(c) if c in header else None for c in ALL_COLUMNS]
        rows: dict[str, list[list[str]]] = {}
        for raw in reader:
            if len(raw) != len(header):  # the reader would quarantine it
                source.skipped_rows += 1
                continue
            row = raw if at == list(range(len(ALL_COLUMNS))) else [raw[i] if i is not None else "" for i in at]
            rows.setdefault(row[0], []).append(row)
    return rows


def _source_patient(rows: list[list[str]], source: Source) -> SourcePatient:
    birth, gender, events = None, "", []
    dates: dict[str, datetime] = {}  # a visit's rows share their times: parse each once

    def when(text: str) -> datetime:
        if text not in dates:
            dates[text] = parse_fhir_datetime(text).replace(tzinfo=None, microsecond=0)
        return dates[text]

    for row in rows:
        try:
            if row[2] == "patient":
                birth = when(row[1]).date() if row[1] else None
                gender = row[4]
            else:
                events.append((when(row[1]), when(row[8]) if row[8] else None, row))
        except ResourceError:
            source.skipped_rows += 1
    # Encounters first at equal times, as the reader orders a timeline, so each opens the visit its rows belong to.
    events.sort(key=lambda e: (e[0], e[2][2] != "encounter"))
    visits, group, until = [], [], None
    for start, end, row in events:
        if row[2] == "encounter":
            visits.append(_visit(group, source))
            group, until = [(start, end, row)], end or start
        elif until is not None and start <= until:
            group.append((start, end, row))
        else:  # after the visit's end: rows outside any encounter
            if until is not None:
                visits.append(_visit(group, source))
                group, until = [], None
            group.append((start, end, row))
    visits.append(_visit(group, source))
    return SourcePatient(birth, gender, tuple(v for v in visits if v is not None))


def _visit(group: list, source: Source) -> Visit | None:
    if not group:
        return None
    slots: dict[datetime, int] = {}
    care, state, procedures = [], [], []
    encounter = None
    for start, end, row in group:
        concept = concept_id(row[3], row[4])
        source.names.setdefault(concept, row[5])
        line = _template_row(row, slots.setdefault(start, len(slots) + 1),
                             slots.setdefault(end, len(slots) + 1) if end else None)
        if row[2] == "encounter":
            encounter = concept
            source.visit_types[concept] += 1
        if row[2] == "procedure":
            procedures.append((concept, line))
            source.procedure_types[concept] += 1
        else:
            (state if row[2] in STATE_KINDS else care).append(line)
    return Visit(encounter, tuple(slots), "".join(care), tuple(procedures), "".join(state), (len(care), len(state)))


_LINE = io.StringIO()
_WRITER = csv.writer(_LINE, lineterminator="\n")


def _template_row(row: list[str], time_slot: int, end_slot: int | None) -> str:
    """The row as written, with {0} for the patient id and {n} for its dates; its own braces doubled, so
    str.format gives them back as they were."""
    literals = [*row[2:8], row[9]]
    if any("{" in v or "}" in v or "\r" in v for v in literals):
        literals = [v.replace("{", "{{").replace("}", "}}") for v in newlines_as_lf(literals)]
    _LINE.seek(0)
    _LINE.truncate()
    _WRITER.writerow(["{0}", f"{{{time_slot}}}", *literals[:6], f"{{{end_slot}}}" if end_slot else "", literals[6]])
    return _LINE.getvalue()


def protected_concepts(profile: TaskProfile) -> frozenset[str]:
    """What a site's pattern never drops or thins: the profile's prediction points and what its pregnancy logic
    reads (first visit, scheduled visits, pregnancy starts, stage enders), so every site still yields examples."""
    enders = (c for concepts in profile.stage_enders.values() for c in concepts)
    return frozenset({*profile.prediction_points, *profile.scheduled_visits, *profile.intrapartum_points,
                      *profile.pregnancy_start, *enders, *([profile.first_visit] if profile.first_visit else [])})


def care_pattern(source: Source, protected: frozenset[str], rng: random.Random) -> CarePattern:
    common = [c for c, _ in sorted(source.visit_types.items(), key=lambda kv: (-kv[1], kv[0]))
              if c not in protected][:CANDIDATE_VISIT_TYPES]
    picked = rng.sample(common, min(len(common), 3 * VISIT_TYPES_PER_CHANGE))
    k = VISIT_TYPES_PER_CHANGE
    procedures = sorted(c for c in source.procedure_types if c not in protected)
    dropped = rng.sample(procedures, round(len(procedures) * DROPPED_PROCEDURE_SHARE))
    return CarePattern(tuple(sorted(picked[:k])), tuple(sorted(picked[k:2 * k])), tuple(sorted(picked[2 * k:3 * k])),
                       tuple(sorted(dropped)))


def render_patient(patient: SourcePatient, pattern: CarePattern, rng: random.Random) -> tuple[str, str, int]:
    """(fresh id, her CSV rows, row count) of one resampled copy of `patient` at a site with `pattern`."""
    pid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    shift = timedelta(days=-rng.randint(1, MAX_SHIFT_DAYS))
    birth = (patient.birth + shift).isoformat() if patient.birth else ""
    parts = [f"{pid},{birth},patient,,{patient.gender},,,,,\n"]
    rows = 1
    dropped, thinned, favoured = pattern.dropped_visits, pattern.thinned_visits, pattern.favoured_visits
    for visit in patient.visits:
        stamps = [(t + shift).isoformat() + "Z" for t in visit.times]
        parts.append(visit.state.format(pid, *stamps))
        rows += visit.rows[1]
        kind = visit.encounter
        if kind in dropped or (kind in thinned and rng.random() >= THINNED_KEEP):
            continue
        rows += _append_care(parts, visit, pid, stamps, pattern)
        if kind in favoured:
            again = shift + timedelta(days=rng.randint(*REPEAT_AFTER_DAYS))
            rows += _append_care(parts, visit, pid, [(t + again).isoformat() + "Z" for t in visit.times], pattern)
    return pid, "".join(parts), rows


def _append_care(parts: list[str], visit: Visit, pid: str, stamps: list[str], pattern: CarePattern) -> int:
    parts.append(visit.care.format(pid, *stamps))
    kept = [row for concept, row in visit.procedures if concept not in pattern.dropped_procedures]
    parts.extend(row.format(pid, *stamps) for row in kept)
    return visit.rows[0] + len(kept)


@dataclass(frozen=True)
class SiteTask:
    name: str
    index: int
    patients: int
    seed: int
    pattern: CarePattern
    out: Path


def site_rng(seed: int, index: int, stream: str) -> random.Random:
    # A string seed is hashed the same way in every process, so a site's draws do not depend on which worker runs it.
    return random.Random(f"pmlm-synth-consortium:{seed}:{index}:{stream}")


_SOURCE: Source | None = None  # set in each worker before it writes sites


def _adopt(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def write_site(task: SiteTask) -> dict:
    """Stream one site's table to OUT/<site>/events.csv.gz (gzip without name or time: byte-reproducible)."""
    rng = site_rng(task.seed, task.index, "patients")
    folder = task.out / task.name
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / ".events.csv.gz.partial"
    rows = 0
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="",
                                                   compresslevel=GZIP_LEVEL) as gz:
        gz.write((",".join(ALL_COLUMNS) + "\n").encode())
        for _ in range(task.patients):
            patient = _SOURCE.patients[rng.randrange(len(_SOURCE.patients))]
            _, text, n = render_patient(patient, task.pattern, rng)
            gz.write(text.encode("utf-8"))
            rows += n
    os.replace(partial, folder / "events.csv.gz")
    return {"site": task.name, "patients": task.patients, "rows": rows,
            "bytes": (folder / "events.csv.gz").stat().st_size}


def site_names(sites: int) -> list[str]:
    width = max(3, len(str(sites)))  # zero-padded: the folders sort in site order
    return [f"site_{i:0{width}d}" for i in range(1, sites + 1)]


def prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty `out` unless `force` and it holds an earlier resampled consortium (then it is replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        provenance = out / "PROVENANCE.md"
        earlier = provenance.is_file() and provenance.read_text(errors="replace").startswith(PROVENANCE_TITLE)
        if not force:
            raise ValueError(f"--out {out} is not empty; choose an empty or new directory"
                             + (" (or --force to replace the resampled consortium in it)" if earlier else ""))
        if not earlier:
            raise ValueError(f"--out {out} is not empty and holds no earlier synth-consortium output (its "
                             "PROVENANCE.md): --force replaces only that; choose an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def synthesize_consortium(out: Path, sites: int, patients: int, profile: TaskProfile, source_dir: Path | None = None,
                          seed: int = 0, force: bool = False, jobs: int = 1, progress: bool = True) -> dict:
    """Write `sites` site folders of `patients` resampled patients each under `out` from `source_dir` (None: the
    bundled sample), and its PROVENANCE.md. Returns what was written: source size, each site's pattern and counts.
    Same arguments, same bytes, whatever `jobs` is."""
    if sites < 1 or patients < 1:
        raise ValueError(f"--sites {sites} --patients {patients}: both must be at least 1")
    source = read_source(SAMPLE_DATA if source_dir is None else source_dir)
    prepare_out(out, force)
    protected = protected_concepts(profile)
    tasks = [SiteTask(name, i, patients, seed, care_pattern(source, protected, site_rng(seed, i, "pattern")), Path(out))
             for i, name in enumerate(site_names(sites))]
    bar = tqdm(total=sites * patients, desc="resampling", unit=" patients", file=sys.stderr, disable=not progress)
    written = []
    if jobs > 1 and sites > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, sites), _adopt, (source,)) as pool:
            for summary in pool.imap_unordered(write_site, tasks):
                written.append(summary)
                bar.update(summary["patients"])
    else:
        _adopt(source)
        for task in tasks:
            written.append(write_site(task))
            bar.update(task.patients)
    bar.close()
    by_name = {s["site"]: s for s in written}
    result = {"source": None if source_dir is None else str(source_dir), "source_patients": len(source.patients),
              "skipped_rows": source.skipped_rows, "seed": seed, "profile": profile.name, "patients_per_site": patients,
              "settings": {"max_shift_days": MAX_SHIFT_DAYS, "thinned_keep": THINNED_KEEP,
                           "repeat_after_days": REPEAT_AFTER_DAYS},
              "sites": [{**by_name[t.name], "pattern": t.pattern} for t in tasks]}
    write_provenance(Path(out), result, source.names)
    return result
