"""The FHIR loader on real generator output and on every kind of bad input."""

import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from pmlm.client.ingest import RecordReader
from pmlm.common.schema import EVENT_KINDS


def _read(path, **kw):
    reader = RecordReader(path, **kw)
    timelines = list(reader)
    return timelines, reader.quarantined


def test_real_bundles_become_sorted_typed_timelines(synthea_bundles):
    files = sorted(synthea_bundles.glob("*.json"))
    timelines, quarantined = _read(synthea_bundles)
    assert quarantined == []
    assert len(timelines) == len(files)
    for t in timelines:
        times = [e.time for e in t.events]
        assert times == sorted(times)
        assert {e.kind for e in t.events} >= {"encounter", "condition", "procedure", "observation", "note"}
        assert {e.kind for e in t.events} <= set(EVENT_KINDS)
        assert t.birth_date is not None and t.gender == "female"
        bp = [e for e in t.events if e.concept == "loinc:8480-6"]
        assert bp and all(isinstance(e.value, float) and e.unit for e in bp)  # systolic from the BP panel


def test_no_name_or_address_survives_ingestion(synthea_bundles):
    for path in sorted(synthea_bundles.glob("*.json")):
        bundle = json.loads(path.read_text())
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        street = patient["address"][0]["line"][0]
        (timeline,), _ = _read(path)
        values = " ".join(str(e.value) for e in timeline.events if e.value is not None)
        assert street not in values
        assert patient["name"][0]["family"] not in values


def test_notes_lose_patient_names_and_absolute_dates(synthea_bundles):
    for path in sorted(synthea_bundles.glob("*.json")):
        bundle = json.loads(path.read_text())
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        given = patient["name"][0]["given"][0]
        raw_notes = [base64.b64decode(e["resource"]["content"][0]["attachment"]["data"]).decode()
                     for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
        assert any(given in n for n in raw_notes), "fixture should contain the name in raw notes"
        (timeline,), _ = _read(path)
        notes = [e.value for e in timeline.events if e.kind == "note"]
        assert len(notes) == len(raw_notes)
        for note in notes:
            assert given not in note
            assert patient["name"][0]["family"] not in note
            assert not re.search(r"\d{4}-\d{2}-\d{2}", note)


def _bundle(*resources, patient=True, pid="p1"):
    entries = []
    if patient:
        entries.append({"fullUrl": f"urn:uuid:{pid}", "resource": {"resourceType": "Patient", "id": pid,
                                                                 "birthDate": "1990-05-01", "gender": "female",
                                                                 "name": [{"given": ["Ann12"], "family": "Lee34"}]}})
    for r in resources:
        entries.append({"resource": {"subject": {"reference": f"urn:uuid:{pid}"}, **r}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


ENCOUNTER = {"resourceType": "Encounter", "id": "e1", "class": {"code": "AMB"},
             "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "424619006",
                                   "display": "Prenatal visit"}]}],
             "period": {"start": "2024-01-02T10:00:00+00:00", "end": "2024-01-02T10:30:00+00:00"}}


def _obs(value, when="2024-01-02T10:00:00Z", rid="o1"):
    return {"resourceType": "Observation", "id": rid,
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"}]},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "kg"}}


@pytest.fixture
def bad_batch(tmp_path) -> Path:
    d = tmp_path / "batch"
    d.mkdir()
    (d / "good.json").write_text(json.dumps(_bundle(ENCOUNTER, _obs(70.5))))
    (d / "invalid.json").write_text("{not json")
    (d / "truncated.json").write_text(json.dumps(_bundle(ENCOUNTER))[:-40])
    (d / "no_patient.json").write_text(json.dumps(_bundle(ENCOUNTER, patient=False)))
    (d / "unknown_type.json").write_text(json.dumps(_bundle(ENCOUNTER, {"resourceType": "Spaceship", "id": "x"},
                                                            pid="u1")))
    (d / "bad_date.json").write_text(json.dumps(_bundle(ENCOUNTER, _obs(70.0, when="yesterday-ish", rid="bd"),
                                                        pid="d1")))
    (d / "non_numeric.json").write_text(json.dumps(_bundle(ENCOUNTER, _obs("seventy", rid="nn"), pid="n1")))
    (d / "utf16.json").write_bytes(json.dumps(_bundle(ENCOUNTER)).encode("utf-16"))
    (d / "empty.json").write_bytes(b"")
    (d / "wrong_types.json").write_text(json.dumps(_bundle(ENCOUNTER, {"resourceType": "Condition", "id": "c1",
                                                                       "code": "not-a-concept",
                                                                       "onsetDateTime": "2024-01-01"}, pid="w1")))
    (d / "z_dup.json").write_text(json.dumps(_bundle(ENCOUNTER)))
    (d / "not_bundle.json").write_text(json.dumps({"resourceType": "Patient", "id": "lonely"}))
    with open(d / "huge.json", "wb") as f:  # 200 MB, sparse on disk
        f.seek(200 * 2**20)
        f.write(b"}")
    lines = [json.dumps(_bundle(ENCOUNTER, pid="p2")), "{broken", ""]
    (d / "bundles.ndjson").write_text("\n".join(lines))
    with gzip.open(d / "zipped.json.gz", "wt") as f:
        f.write(json.dumps(_bundle(ENCOUNTER, pid="p3")))
    return d


def test_bad_input_is_quarantined_with_reasons_and_good_records_kept(bad_batch):
    timelines, quarantined = _read(bad_batch)
    by_file = {}
    for q in quarantined:
        by_file.setdefault(Path(q.file).name, []).append(q)
    reason = lambda name: " | ".join(q.reason for q in by_file[name])  # noqa: E731

    assert "invalid or truncated JSON" in reason("invalid.json")
    assert "invalid or truncated JSON" in reason("truncated.json")
    assert "no Patient" in reason("no_patient.json")
    assert "unknown resource type 'Spaceship'" in reason("unknown_type.json")
    assert "unparseable date" in reason("bad_date.json")
    assert by_file["bad_date.json"][0].resource == "Observation/bd"
    assert "not numeric" in reason("non_numeric.json")
    assert "UTF-8" in reason("utf16.json")
    assert "empty file" in reason("empty.json")
    assert "Condition" in reason("wrong_types.json")
    assert "not a FHIR Bundle" in reason("not_bundle.json")
    assert "exceeds" in reason("huge.json")
    assert by_file["bundles.ndjson"][0].resource == "line 2"

    by_id = {t.patient_id: t for t in timelines}
    # The valid parts of damaged bundles go through: their encounters survive the bad resource.
    assert sorted(by_id) == ["d1", "n1", "p1", "p2", "p3", "u1", "w1"]
    for pid in ("d1", "n1", "u1", "w1"):
        assert [e.kind for e in by_id[pid].events] == ["encounter"]
    assert [e.kind for e in by_id["p1"].events] == ["encounter", "observation"]
    assert by_id["p1"].events[1].value == 70.5
    # The same patient in a second file is reported, not merged silently.
    assert [Path(q.file).name for q in quarantined if "already read" in q.reason] == ["z_dup.json"]


def test_nothing_crashes_on_arbitrary_json_shapes(tmp_path):
    shapes = [[], 1, "x", None, {"resourceType": "Bundle"}, {"resourceType": "Bundle", "entry": [1, None, {}]},
              {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}}]},
              _bundle({"resourceType": "Observation", "id": "o", "code": {"coding": [{}]}}),
              _bundle({"resourceType": "Encounter", "id": "e", "type": "x", "period": 3}),
              _bundle({"resourceType": "DocumentReference", "id": "d", "type": ENCOUNTER["type"][0],
                       "date": "2024-01-01", "content": [{"attachment": {"data": "!!!notbase64"}}]})]
    for i, shape in enumerate(shapes):
        (tmp_path / f"s{i}.json").write_text(json.dumps(shape))
    timelines, quarantined = _read(tmp_path)
    files_with_reason = {Path(q.file).name for q in quarantined}
    assert files_with_reason == {f"s{i}.json" for i in range(len(shapes))}
    assert all(q.reason for q in quarantined)


def test_memory_does_not_hold_previous_files(synthea_bundles, tmp_path):
    # Streaming: the reader yields each timeline before reading the next file.
    d = tmp_path / "many"
    d.mkdir()
    for i, src in enumerate(sorted(synthea_bundles.glob("*.json"))):
        shutil.copy(src, d / f"{i}.json")
    reader = RecordReader(d)
    it = iter(reader)
    next(it)
    assert reader.files_read == 1
