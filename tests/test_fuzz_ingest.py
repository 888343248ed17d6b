"""Hostile input: hypothesis-made malformed FHIR bundles and CSV rows, each in a batch with valid neighbours.

Every example is read by the real RecordReader from files on disk. Whatever the input, nothing may
escape as an exception, each hostile record must come out either quarantined with a reason or accepted
as well-formed events, and the valid records around it must come through untouched.
"""

from __future__ import annotations

import base64
import copy
import csv
import gzip
import io
import json
import math
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pmlm.client.ingest import RecordReader
from pmlm.client.ingest.csv_events import write_csv_timelines
from pmlm.client.ingest.fhir import IGNORED_RESOURCES
from pmlm.common.schema import EVENT_KINDS, IDENTIFYING_OBSERVATIONS, Event, Timeline, concept_id

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
ISO_DATE = re.compile(r"(?<![0-9])[0-9]{4}-[0-9]{2}-[0-9]{2}(?![0-9])")


# -- valid records ------------------------------------------------------------------------------------------

def coded(code: str, display: str, system: str = SNOMED) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def note_data(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()


PATIENT = {"resourceType": "Patient", "id": "fuzzed", "birthDate": "1991-04-02", "gender": "female",
           "name": [{"given": ["Ann12"], "family": "Lee34"}]}
ENCOUNTER = {"resourceType": "Encounter", "id": "enc", "class": {"code": "AMB"},
             "type": [coded("424619006", "Prenatal visit")],
             "period": {"start": "2024-01-02T10:00:00+00:00", "end": "2024-01-02T10:30:00+00:00"}}
TEMPLATES = {
    "Encounter": ENCOUNTER,
    "Condition": {"resourceType": "Condition", "id": "c", "code": coded("72892002", "Normal pregnancy"),
                  "onsetDateTime": "2024-01-01T09:00:00Z", "abatementDateTime": "2024-09-01T09:00:00Z"},
    "Procedure": {"resourceType": "Procedure", "id": "pr", "code": coded("5880005", "Physical exam"),
                  "performedPeriod": {"start": "2024-01-02T10:00:00Z", "end": "2024-01-02T10:15:00Z"}},
    "Observation": {"resourceType": "Observation", "id": "o", "code": coded("29463-7", "Body Weight", LOINC),
                    "effectiveDateTime": "2024-01-02T10:00:00Z", "valueQuantity": {"value": 70.5, "unit": "kg"}},
    "BloodPressure": {"resourceType": "Observation", "id": "bp", "code": coded("85354-9", "Blood pressure", LOINC),
                      "effectiveDateTime": "2024-01-02T10:00:00Z",
                      "component": [{"code": coded("8480-6", "Systolic", LOINC), "valueQuantity": {"value": 118}},
                                    {"code": coded("8462-4", "Diastolic", LOINC), "valueQuantity": {"value": 76}}]},
    "DiagnosticReport": {"resourceType": "DiagnosticReport", "id": "dr", "code": coded("58410-2", "CBC panel", LOINC),
                         "effectiveDateTime": "2024-01-02T10:00:00Z"},
    "MedicationRequest": {"resourceType": "MedicationRequest", "id": "m", "authoredOn": "2024-01-02T10:00:00Z",
                          "medicationCodeableConcept": coded("310325", "Ferrous sulfate 325 MG",
                                                             "http://www.nlm.nih.gov/research/umls/rxnorm")},
    "Immunization": {"resourceType": "Immunization", "id": "i", "occurrenceDateTime": "2024-01-02T10:00:00Z",
                     "vaccineCode": coded("115", "Tdap", "http://hl7.org/fhir/sid/cvx")},
    "DocumentReference": {"resourceType": "DocumentReference", "id": "d", "type": coded("34117-2", "H&P note", LOINC),
                          "date": "2024-01-02T10:00:00Z",
                          "content": [{"attachment": {"contentType": "text/plain",
                                                      "data": note_data("Ann12 seen on 2024-01-02.")}}]},
    "Patient": {**PATIENT, "id": "second"},
}


def bundle(pid: str, *resources: dict) -> dict:
    entries = [{"fullUrl": f"urn:uuid:{pid}", "resource": {**PATIENT, "id": pid}}]
    for r in resources:
        entries.append({"fullUrl": f"urn:uuid:{r.get('id')}",
                        "resource": {"subject": {"reference": f"urn:uuid:{pid}"}, **r}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def neighbour_bundle(pid: str) -> bytes:
    return json.dumps(bundle(pid, ENCOUNTER, TEMPLATES["Observation"], TEMPLATES["DocumentReference"])).encode()


NEIGHBOUR_EVENTS = ["encounter", "observation", "note"]  # what each neighbour bundle must yield


# -- hostile values ---------------------------------------------------------------------------------------

def _nested(depth: int, leaf=1) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


odd_text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from([
    "", " ", "\x00", "\u202eRTL override", "\u200b\u200d\ufeff", "e\u0301\u0301\u0301", "🤰🏽" * 3,
    "'; DROP TABLE events; --", "<script>alert(1)</script>", "${jndi:ldap://x}", "../../etc/passwd", "%s%n%x",
    "NaN", "Infinity", "-inf", "1e999", "null", "[]", "{}", "\\u0000",
])
lone_surrogate = st.just("\ud800")  # not valid in UTF-8 nor (unpaired) in strict JSON: a whole-document error
huge_text = st.builds(lambda piece, n: piece * n, st.sampled_from(["\u0301", "🤰", "a", "\x00", "ß", "\n"]),
                      st.integers(10_000, 200_000))
bad_dates = st.sampled_from([
    "yesterday", "2024-13-01", "2024-02-30", "2024-00", "0001-01-01", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00", "2024-01-01T25:00:00Z", "2024-01-01T10:00:00+24:00", "+2024-01-01", "2024-1-1",
    "１９９０-０５-０１", "2024", "2024-06", "99999-01-01", "2024-01-01T10:00:00.123456789Z", "--", "T",
]) | st.datetimes().map(datetime.isoformat) | odd_text
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), odd_text, bad_dates)
hostile = st.one_of(
    scalars,
    huge_text,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
                 max_leaves=8),
    st.integers(2, 900).map(_nested),  # deep, but under the JSON parser's depth limit
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


@st.composite
def mutated_resource(draw) -> dict:
    """A valid template with one hostile change: a value replaced or removed, a wrong resourceType,
    a reference to a patient who is not there, or hostile note text."""
    resource = copy.deepcopy(TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))])
    how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "resource_type", "reference", "note"]))
    if how == "resource_type":
        resource["resourceType"] = draw(st.sampled_from(["Spaceship", "patient", "Observation ", "Claim",
                                                         "Organization", "Encounter"]) | hostile)
    elif how == "reference":
        resource["subject"] = {"reference": draw(st.sampled_from(["urn:uuid:nobody", "Patient/nobody", ""]) | hostile)}
    elif how == "note":
        text = draw(odd_text) + draw(st.sampled_from(["2024-03-01", "_2019-12-31T08:00:00Z", "Ann12", "LEE34"]))
        resource = {**copy.deepcopy(TEMPLATES["DocumentReference"]), "id": "hostile-note"}
        resource["content"][0]["attachment"]["data"] = draw(
            st.just(note_data(text + draw(odd_text))) | odd_text | st.just(base64.b64encode(b"\xff\xfe").decode()))
    else:
        path = draw(st.sampled_from(_paths(resource)))
        holder = resource
        for key in path[:-1]:
            holder = holder[key]
        if how == "delete":
            del holder[path[-1]]
        else:
            holder[path[-1]] = draw(hostile)
    return resource


def _silently_skipped(resource: dict) -> bool:
    """Valid resources PMLM documents as skipped without quarantine."""
    rtype = resource.get("resourceType")
    if rtype in IGNORED_RESOURCES:
        return True
    if rtype == "DiagnosticReport" and resource.get("presentedForm"):
        return True  # a rendered note; its DocumentReference carries the text
    if rtype == "Observation":
        try:
            first = resource["code"]["coding"][0]
            return concept_id(str(first.get("system", "")), str(first["code"])) in IDENTIFYING_OBSERVATIONS
        except (KeyError, IndexError, TypeError, AttributeError):
            return False
    return False


# -- checks -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_dir():
    folder = Path(tempfile.mkdtemp(prefix="pmlm-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fresh(folder: Path) -> Path:
    for path in folder.iterdir():
        path.unlink()
    return folder


def read_all(folder: Path):
    reader = RecordReader(folder)
    timelines = {t.patient_id: t for t in reader}  # any exception fails the example
    for q in reader.quarantined:
        assert isinstance(q.reason, str) and q.reason.strip(), q
    for t in timelines.values():
        for e in t.events:
            assert e.kind in EVENT_KINDS and e.time.tzinfo is not None and e.code.strip()
            assert e.value is None or isinstance(e.value, str) or math.isfinite(e.value)
            if e.kind == "note":
                assert not ISO_DATE.search(e.value), "an absolute date survived in a note"
        assert [e.time for e in t.events] == sorted(e.time for e in t.events)
    return timelines, reader.quarantined


def assert_neighbours_kept(timelines: dict, *pids: str) -> None:
    for pid in pids:
        assert pid in timelines, f"valid neighbour {pid} was lost"
        assert [e.kind for e in timelines[pid].events] == NEIGHBOUR_EVENTS


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# Whole files: not JSON, truncated, flipped bytes, the wrong shape, NaN, too deep, not UTF-8, bad gzip.
@st.composite
def hostile_document(draw) -> tuple[str, bytes]:
    valid = json.dumps(bundle("doc", ENCOUNTER, TEMPLATES["BloodPressure"]))
    how = draw(st.sampled_from(["bytes", "truncated", "flipped", "shape", "nan", "deep", "utf16", "ndjson", "csv"]))
    if how == "bytes":
        data = draw(st.binary(max_size=300))
    elif how == "truncated":
        data = valid.encode()[: draw(st.integers(0, len(valid) - 1))]
    elif how == "flipped":
        raw = bytearray(valid.encode())
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        data = bytes(raw)
    elif how == "shape":
        doc = draw(st.one_of(hostile, lone_surrogate, st.fixed_dictionaries({"resourceType": st.just("Bundle"),
                                                             "entry": hostile}),
                             st.fixed_dictionaries({"resourceType": st.just("Bundle"),
                                                    "entry": st.lists(hostile, max_size=4)})))
        data = json.dumps(doc).encode()
    elif how == "nan":
        data = valid.replace("118", draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))).encode()
    elif how == "deep":
        depth = draw(st.integers(1000, 5000))  # past the parser's depth limit; written as text, as json would recurse
        data = b'{"resourceType": "Bundle", "entry": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "utf16":
        data = valid.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"]))) + b"\xe9"
    elif how == "ndjson":  # several bundles, one per line, some hostile
        lines = draw(st.lists(st.sampled_from([valid, "", "{", "[]", valid[:50], '{"resourceType":"Bundle"}'])
                              | odd_text | lone_surrogate,
                              min_size=1, max_size=5))
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
        return _packed(draw, "fuzz.ndjson", data)
    else:
        data = draw(st.binary(max_size=200)) if draw(st.booleans()) else \
            ("patient_id,time\n" + draw(odd_text)).encode("utf-8", "surrogatepass")
        return _packed(draw, "fuzz.csv", data)
    return _packed(draw, "fuzz.json", data)


def _packed(draw, name: str, data: bytes) -> tuple[str, bytes]:
    packing = draw(st.sampled_from(["plain", "plain", "gzip", "bad-gzip"]))
    if packing == "gzip":
        return name + ".gz", _gzip(data)
    if packing == "bad-gzip":
        packed = bytearray(_gzip(data))
        packed[draw(st.integers(0, len(packed) - 1))] ^= draw(st.integers(1, 255))
        return name + ".gz", bytes(packed[: draw(st.integers(0, len(packed)))])
    return name, data


@settings(max_examples=350, **FUZZ)
@given(document=hostile_document())
def test_hostile_files_are_quarantined_and_neighbour_files_kept(batch_dir, document):
    name, data = document
    folder = fresh(batch_dir)
    (folder / "a_neighbour.json").write_bytes(neighbour_bundle("before"))
    (folder / name).write_bytes(data)
    (folder / "z_neighbour.ndjson.gz").write_bytes(_gzip(neighbour_bundle("after")))
    timelines, quarantined = read_all(folder)
    assert_neighbours_kept(timelines, "before", "after")
    from_fuzz = [t for t in timelines.values() if t.source.endswith(name)]
    assert from_fuzz or any(q.file.endswith(name) for q in quarantined), "a hostile file vanished without a reason"
    event("quarantined" if quarantined else "accepted")  # --hypothesis-show-statistics shows the mix
    assert all(q.file.endswith(name) for q in quarantined), "a valid neighbour file was quarantined"


@settings(max_examples=450, **FUZZ)
@given(resource=mutated_resource())
def test_hostile_resources_are_quarantined_and_the_rest_of_the_bundle_kept(batch_dir, resource):
    folder = fresh(batch_dir)
    (folder / "a_neighbour.json").write_bytes(neighbour_bundle("before"))
    (folder / "m_fuzz.json").write_text(json.dumps(bundle("main", ENCOUNTER, resource)))
    (folder / "z_neighbour.json").write_bytes(neighbour_bundle("after"))
    timelines, quarantined = read_all(folder)
    assert_neighbours_kept(timelines, "before", "after")
    assert "main" in timelines, "the valid patient beside a hostile resource was lost"
    main_events = timelines["main"].events
    assert any(e.kind == "encounter" and e.code == "424619006" and e.time.year == 2024 for e in main_events)
    accepted = len(main_events) > 1 or len(timelines) > 3  # its events, or the second Patient it was
    rejected = [q for q in quarantined if q.file.endswith("m_fuzz.json")]
    assert accepted or rejected or _silently_skipped(resource), "a hostile resource vanished without a reason"
    event("quarantined" if rejected else "accepted" if accepted else "skipped as documented")
    assert all(q.file.endswith("m_fuzz.json") for q in quarantined), "a valid neighbour file was quarantined"


# CSV rows: every column hostile or valid, written as proper CSV so only the values are wrong.
VALID_ROW = {"patient_id": "main", "time": "2024-01-02T10:00:00Z", "kind": "observation", "system": LOINC,
             "code": "29463-7", "display": "Body Weight", "value": "70.5", "unit": "kg", "end": "",
             "encounter_class": ""}
COLUMNS = list(VALID_ROW)
csv_values = odd_text | bad_dates | huge_text | st.sampled_from(
    ["nan", "NaN", "inf", "-Infinity", "1e999", "1_000", "0x1A", " 70.5 ", "70,5", "patient", "note", "encounter",
     "teleportation", "", " ", "\"", "a\nb", "\r", "main", "56799-0"])


@st.composite
def hostile_row(draw) -> list[str]:
    row = dict(VALID_ROW)
    for column in draw(st.sets(st.sampled_from(COLUMNS), min_size=1, max_size=4)):
        row[column] = draw(csv_values)
    values = [row[c] for c in COLUMNS]
    arity = draw(st.sampled_from(["same", "same", "same", "fewer", "more"]))
    if arity == "fewer":
        values = values[: draw(st.integers(1, len(values) - 1))]
    elif arity == "more":
        values += draw(st.lists(odd_text, min_size=1, max_size=3))
    return values


def csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()  # "\r\n" rows: the writer then quotes every value holding "\r" or "\n"
    csv.writer(out, lineterminator="\r\n").writerows([COLUMNS] + rows)
    return out.getvalue()


def neighbour_rows(pid: str) -> list[list[str]]:
    return [[pid, "1990-01-01", "patient", "", "female", "", "", "", "", ""],
            [pid, "2024-01-02T10:00:00Z", "encounter", SNOMED, "424619006", "Prenatal visit", "", "", "", "AMB"],
            [pid, "2024-01-02T10:00:00Z", "observation", LOINC, "29463-7", "Body Weight", "70.5", "kg", "", ""]]


def assert_csv_neighbours_kept(timelines: dict, *pids: str) -> None:
    for pid in pids:
        assert pid in timelines, f"valid neighbour {pid} was lost"
        t = timelines[pid]
        assert [e.kind for e in t.events] == ["encounter", "observation"] and t.birth_date.year == 1990


@settings(max_examples=350, **FUZZ)
@given(row=hostile_row(), gzipped=st.booleans())
def test_hostile_csv_rows_are_quarantined_and_neighbour_rows_kept(batch_dir, row, gzipped):
    folder = fresh(batch_dir)
    text = csv_text(neighbour_rows("before") + [row] + neighbour_rows("after"))
    name = "events.csv.gz" if gzipped else "events.csv"
    data = text.encode("utf-8", "surrogatepass")
    (folder / name).write_bytes(_gzip(data) if gzipped else data)
    (folder / "z_other.csv").write_text(csv_text(neighbour_rows("elsewhere")))
    timelines, quarantined = read_all(folder)
    assert_csv_neighbours_kept(timelines, "before", "after", "elsewhere")
    assert len(quarantined) <= 1, "one hostile row cost more than its own quarantine record"
    pid = row[0].strip() if row else ""
    baseline = 2 if pid in ("before", "after") else 0
    accepted = pid in timelines and (len(timelines[pid].events) > baseline or (len(row) > 2 and row[2] == "patient"))
    identifying = len(row) > 4 and concept_id(row[3], row[4]) in IDENTIFYING_OBSERVATIONS
    assert accepted or quarantined or identifying, "a hostile row vanished without a reason"
    event("quarantined" if quarantined else "accepted" if accepted else "dropped as an identifier")
    if quarantined:
        assert quarantined[0].file.endswith(name) and quarantined[0].resource.startswith("line ")


@settings(max_examples=150, **FUZZ)
@given(line=st.binary(max_size=120) | odd_text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_raw_hostile_csv_lines_never_cost_earlier_rows(batch_dir, line):
    # An unbalanced quote may legitimately swallow the rows after it, so neighbours sit before it
    # and in another file.
    folder = fresh(batch_dir)
    head = csv_text(neighbour_rows("before")).encode()
    (folder / "events.csv").write_bytes(head + line.replace(b"\n", b" ") + b"\n")
    (folder / "z_other.csv").write_text(csv_text(neighbour_rows("elsewhere")))
    timelines, quarantined = read_all(folder)
    assert_csv_neighbours_kept(timelines, "before", "elsewhere")
    assert all(q.file.endswith("events.csv") for q in quarantined)
    event("quarantined" if quarantined else "accepted")


def test_line_breaks_inside_notes_survive_the_event_table(tmp_path):
    # The table's own writer once left a bare "\r" unquoted, and the reader split the row there.
    when = datetime(2024, 1, 2, 10, tzinfo=timezone.utc)
    notes = ["first line\r\nsecond line", "old Mac\rline", "tab\tand \"quotes\", commas"]
    timeline = Timeline("p1", when.replace(year=1990), "female",
                        events=[Event(when, "note", LOINC, "34117-2", "Note", text) for text in notes])
    with open(tmp_path / "events.csv", "w", newline="") as out:
        write_csv_timelines([timeline], out)
    reader = RecordReader(tmp_path)
    (again,) = list(reader)
    assert reader.quarantined == []
    assert [e.value for e in again.events] == ["first line\nsecond line", "old Mac\nline", notes[2]]
