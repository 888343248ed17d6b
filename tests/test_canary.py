"""Canaries: unique names, identifiers, addresses, note text and exact values planted in every site's FHIR
records never appear in any byte that leaves a site, after phases A, B and C through the real Flower app.

Where we look: every reply the coordinator received (as the bytes Flower serialises, which the egress mod
also spools), the sites' egress logs, the coordinator's state and everything it wrote (the workdir outside
the sites' own directories: run summaries, countersigned ledger copies, keys). Where it must still be:
the FHIR files themselves (a positive control for the scanner).
"""

from __future__ import annotations

import base64
import collections
import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from pmlm.client.client_app import app as client_app
from pmlm.client.egress import SPOOL_ENV, fields_outside_public_list, read_egress_log
from pmlm.client.ingest import RecordReader
from pmlm.server.in_process import run_in_process
from pmlm.server.server_app import app as server_app

from conftest import SAMPLE

SITES = ("hospital_a", "hospital_b", "hospital_c")
PATIENTS_PER_SITE = 30
SYSTOLIC, WEIGHT = "8480-6", "29463-7"  # LOINC: the self features read blood pressure and weight changes
RUN_CONFIG = {
    "num-server-rounds": 1, "local-epochs": 1, "batch-size": 16, "epsilon": 3.0, "phase-a-epsilon": 1.5,
    "delta": 1e-5, "dim": 16, "points-per-patient": 4, "phases": "abc", "min-nodes": 3,
    "evaluate-each-round": True, "phase-b-rounds": 1, "phase-b-prototypes": 3, "phase-b-min-count": 5,
    "phase-c-rounds": 1, "phase-c-points": 3, "phase-c-rate": 0.3, "phase-c-candidates": 2,
    "phase-c-max-tokens": 16,
}


class Canaries:
    """One site's planted strings and exact values, per patient."""

    def __init__(self, s: int, i: int):
        self.pid = f"canary-pid-{s}{i:03d}-x7q"
        self.given, self.family = f"Zorvanthe{s}{i:03d}", f"Quillibrand{s}{i:03d}"
        self.mrn = f"MRN-CNRY-{s}{i:05d}"
        self.street = f"{400 + i} Peregrine Canary Lane {s}"
        self.city = f"Vexmoorton{s}{i:03d}"
        self.phone = f"555-01{s}{i:02d}-7731"
        self.note = f"CANARY-NOTE-{s}-{i:03d}-wyvern"
        self.systolic = float(f"1{s}{i % 10}.{s}{i:02d}4789")  # e.g. 117.1074789 mmHg
        self.weight = float(f"6{i % 10}.{s}{i:02d}9123")  # kg

    def strings(self) -> list[str]:
        return [self.pid, self.given, self.family, self.mrn, self.street, self.city, self.phone, self.note,
                repr(self.systolic), repr(self.weight)]

    def values(self) -> list[float]:
        return [self.systolic, self.weight]


def _coding(event) -> dict:
    return {"coding": [{"system": event.system, "code": event.code, "display": event.display}]}


def _resource(event, c: Canaries, n: int) -> dict:
    """One sample event as the FHIR resource Synthea would write, with this patient's canaries planted."""
    when, kind = event.time.isoformat(), event.kind
    subject = {"subject": {"reference": f"urn:uuid:{c.pid}"}, "id": f"{c.pid}-{n}"}
    if kind == "encounter":
        period = {"start": when, **({"end": event.end.isoformat()} if event.end else {})}
        return {"resourceType": "Encounter", **subject, "class": {"code": event.encounter_class or "AMB"},
                "type": [_coding(event)], "period": period}
    if kind == "condition":
        return {"resourceType": "Condition", **subject, "code": _coding(event), "onsetDateTime": when,
                **({"abatementDateTime": event.end.isoformat()} if event.end else {})}
    if kind == "procedure":
        return {"resourceType": "Procedure", **subject, "code": _coding(event), "performedDateTime": when}
    if kind == "immunization":
        return {"resourceType": "Immunization", **subject, "vaccineCode": _coding(event), "occurrenceDateTime": when}
    if kind == "medication":
        return {"resourceType": "MedicationRequest", **subject, "medicationCodeableConcept": _coding(event),
                "authoredOn": when}
    if kind == "report":
        return {"resourceType": "DiagnosticReport", **subject, "code": _coding(event), "effectiveDateTime": when}
    if kind == "note":
        text = (f"{event.value or ''}\nSeen today: {c.given} {c.family} ({c.mrn}) of {c.street}, {c.city}; "
                f"phone {c.phone}. Marker {c.note}.")
        return {"resourceType": "DocumentReference", **subject, "type": _coding(event), "date": when,
                "content": [{"attachment": {"contentType": "text/plain",
                                            "data": base64.b64encode(text.encode()).decode()}}]}
    obs = {"resourceType": "Observation", **subject, "code": _coding(event), "effectiveDateTime": when}
    value = {SYSTOLIC: c.systolic, WEIGHT: c.weight}.get(event.code, event.value)
    if isinstance(value, float):
        obs["valueQuantity"] = {"value": value, "unit": event.unit}
    elif value not in (None, ""):
        obs["valueString"] = str(value)
    return obs


def _bundle(timeline, c: Canaries) -> dict:
    patient = {"resourceType": "Patient", "id": c.pid, "gender": timeline.gender,
               "birthDate": timeline.birth_date.date().isoformat(),
               "name": [{"use": "official", "given": [c.given], "family": c.family}],
               "identifier": [{"system": "http://hospital.example/mrn", "value": c.mrn}],
               "address": [{"line": [c.street], "city": c.city, "state": "MA", "postalCode": "02139"}],
               "telecom": [{"system": "phone", "value": c.phone}]}
    entries = [{"fullUrl": f"urn:uuid:{c.pid}", "resource": patient}]
    entries += [{"resource": _resource(e, c, n)} for n, e in enumerate(timeline.events)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _first_patients(site: str, n: int, scratch: Path) -> list:
    """The sample site's first n patients; their rows come first in its table, so the rest is not parsed."""
    seen: set[str] = set()
    with gzip.open(SAMPLE / site / "events.csv.gz", "rt", newline="") as f, \
            open(scratch / "head.csv", "w", newline="") as out:
        rows, writer = csv.reader(f), csv.writer(out)
        writer.writerow(next(rows))
        for row in rows:
            seen.add(row[0])
            if len(seen) > n:
                break
            writer.writerow(row)
    timelines = list(RecordReader(scratch))
    (scratch / "head.csv").unlink()
    return timelines


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Three hospitals of FHIR bundles built from the sample's first patients, canaries in every record."""
    root = tmp_path_factory.mktemp("canary-data")
    scratch = tmp_path_factory.mktemp("canary-scratch")
    planted = {}
    for s, site in enumerate(SITES, start=1):
        (root / site).mkdir()
        planted[site] = []
        for i, timeline in enumerate(_first_patients(site, PATIENTS_PER_SITE, scratch)):
            c = Canaries(s, i)
            (root / site / f"{c.pid}.json").write_text(json.dumps(_bundle(timeline, c)))
            planted[site].append(c)
    return root, planted


@pytest.fixture(scope="module")
def federation(consortium, tmp_path_factory):
    """Phases A, B and C through the real ServerApp and ClientApp (in-process grid, embedded LLM)."""
    data, _ = consortium
    work = tmp_path_factory.mktemp("canary-work")
    spool = tmp_path_factory.mktemp("canary-spool")
    # The sites answer the coordinator's evaluation requests (their policy's choice), so that reply is scanned too.
    nodes = [{"data-dir": str(data / site), "site-id": site, "site-dir": str(work / "sites" / site), "llm": "{}",
              "policy-answer-evaluate": True}
             for site in SITES]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SPOOL_ENV, str(spool))
        grid, server_context = run_in_process(server_app, client_app, nodes, {**RUN_CONFIG, "workdir": str(work)})
    return work, spool, grid, server_context


def _message_bytes(obj) -> bytes:
    """A message (or record dict) as Flower serialises it for sending: every object of its tree, deflated."""
    return b"".join(o.deflate() for o in get_all_nested_objects(obj).values())


def _needles(planted: dict) -> dict[bytes, str]:
    """Byte patterns to look for -> what they are: strings (case-folded) and float64s in both byte orders."""
    needles = {}
    for site, canaries in planted.items():
        for c in canaries:
            for text in c.strings():
                needles[text.lower().encode()] = f"{site}: {text!r}"
            for value in c.values():
                for order in "<>":
                    needles[struct.pack(order + "d", value)] = f"{site}: float64 {value!r}"
    return needles


def _hits(blob: bytes, needles: dict[bytes, str]) -> list[str]:
    folded = blob.lower()
    return [what for needle, what in needles.items() if needle in blob or needle in folded]


def _value_hits(values: np.ndarray, planted: dict) -> list[float]:
    """Exact canary values among an array's elements, at float32 and at float64 precision.

    (Four-byte float32 patterns are not searched in raw bytes: in megabytes of weights they turn up by chance.)"""
    exact = np.array([v for cs in planted.values() for c in cs for v in c.values()])
    flat = np.asarray(values).ravel()
    if not np.issubdtype(flat.dtype, np.floating):
        return []
    found = np.isin(flat, exact) | np.isin(flat.astype(np.float32), exact.astype(np.float32))
    return sorted(set(flat[found].tolist()))


def _arrays_in_file(path: Path):
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            yield from (npz[k] for k in npz.files)
    elif path.suffix in (".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for value in (state.values() if isinstance(state, dict) else [state]):
            if isinstance(value, torch.Tensor):
                yield value.numpy()


def test_the_canaries_are_in_the_records_and_the_scanner_finds_them(consortium):
    data, planted = consortium
    needles = _needles(planted)
    c = planted["hospital_b"][3]
    raw = (data / "hospital_b" / f"{c.pid}.json").read_bytes()
    assert {f"hospital_b: {s!r}" for s in c.strings() if s != c.note} <= set(_hits(raw, needles))  # note: base64
    assert f"hospital_b: float64 {c.systolic!r}" in _hits(b"x" + struct.pack("<d", c.systolic), needles)
    assert _value_hits(np.array([0.5, c.weight], dtype=np.float32), planted) == [float(np.float32(c.weight))]
    # Ingestion keeps the exact values and the note marker: they reach the pipeline, so the test means something.
    (timeline,) = RecordReader(data / "hospital_b" / f"{c.pid}.json")
    assert c.systolic in [e.value for e in timeline.events if e.code == SYSTOLIC]
    assert any(c.note in str(e.value) for e in timeline.events if e.kind == "note")


def test_no_canary_leaves_any_site(consortium, federation):
    _, planted = consortium
    work, spool, grid, server_context = federation
    needles = _needles(planted)
    leaks = []
    # 1. Every reply the coordinator received, as serialised bytes and as decoded arrays; the spool holds the same.
    for node_id, reply in grid.outbox:
        blob = _message_bytes(reply)
        site = SITES[node_id - 1000]
        spooled = spool / site / f"{reply.object_id}.bin"
        assert spooled.read_bytes() == blob, f"spool of {reply.metadata.message_type} differs from what was sent"
        leaks += [f"{reply.metadata.message_type} from {site}: {h}" for h in _hits(blob, needles)]
        for record in (reply.content.array_records.values() if reply.has_content() else []):
            for name, array in record.items():
                leaks += [f"{reply.metadata.message_type} array {name}: {v}" for v in _value_hits(array.numpy(), planted)]
    # 2. The sites' egress logs.
    for site in SITES:
        log = work / "sites" / site / "egress.jsonl"
        leaks += [f"{log}: {h}" for h in _hits(log.read_bytes(), needles)]
    # 3. The coordinator's state and everything written outside the sites' own directories.
    leaks += [f"server state: {h}" for h in _hits(_message_bytes(server_context.state), needles)]
    outside = [p for p in work.rglob("*") if p.is_file() and (work / "sites") not in p.parents]
    assert any("ledger" in str(p) for p in outside), "expected the coordinator's ledger copies in the workdir"
    for path in outside:
        leaks += [f"{path}: {h}" for h in _hits(path.read_bytes(), needles)]
        leaks += [f"{path} array: {v}" for a in _arrays_in_file(path) for v in _value_hits(a, planted)]
    assert leaks == []


def test_every_message_the_coordinator_received_is_in_its_sites_egress_log(federation):
    work, _, grid, _ = federation
    assert not [r.error.reason for _, r in grid.outbox if r.has_error()]  # every phase ran through
    received = collections.Counter((SITES[n - 1000], r.metadata.message_type) for n, r in grid.outbox)
    logged, ids = collections.Counter(), set()
    for site in SITES:
        entries, problems = read_egress_log(work / "sites" / site)
        assert problems == [] and entries
        assert fields_outside_public_list(entries) == []  # only the README's public fields left, all phases
        logged.update((site, e["message_type"]) for e in entries)
        ids |= {e["message_id"] for e in entries}
        secure = [e for e in entries if e["message_type"] == "train.pmlm_secure_sum"]
        assert {e.get("stage") for e in secure} == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        # Recorded after SecAgg+ masking: the plain vector's array record is empty, the masked one is config.
        for e in (e for e in secure if e["stage"] == "collect_masked_vectors"):
            assert e["records"]["fitres.parameters"]["arrays"] == {}
            assert "masked_params" in e["records"]["secaggplus_configs"]["keys"]
    assert logged == received
    assert ids == {reply.object_id for _, reply in grid.outbox}
    # All phases ran: phase A's rounds, evaluation, the model store, SecAgg+ sums (B and C), the ledger copies.
    types = {t for _, t in received}
    assert {"train", "evaluate", "query.store_model", "train.pmlm_secure_sum", "query.phase_b_store",
            "query.phase_c_store", "query.ledger_entries"} <= types
