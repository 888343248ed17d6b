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

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


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


# -- de-identification of notes: every name the record holds, and the usual patterns ---------------------

PLANTED_NOTE = (
    "Prenatal visit. Ann Lee seen with her husband Marcus Whitfield (phone 617-555-0143). "
    "Referred by Dr. Vasquez of Riverside Women's Health Clinic, 200 Harbor Street, Quincy. "
    "Lives at 41 Maple Avenue, Apt 2, Quincy MA 02169. MRN: QX99812 and SSN 999-12-3456. "
    "Mother Ruth Okonkwo attended. Email marcus.w@example.net, portal https://ehr.example.org/p/1. "
    "Seen on March 4, 2024 and 03/18/2024. Fundal height 24 cm, fetal heart tones present, "
    "blood pressure 118/76, no proteinuria, brown discharge noted. Plan: glucose tolerance test."
)


def _identified_bundle():
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1990-05-01", "gender": "female",
               "name": [{"given": ["Ann12"], "family": "Lee34"}],
               "identifier": [{"system": "http://hospital.example/mrn", "value": "QX99812"}],
               "address": [{"line": ["41 Maple Avenue"], "city": "Quincy", "state": "MA", "postalCode": "02169"}],
               "telecom": [{"system": "phone", "value": "617-555-0199"}],
               "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131",
                                                         "code": "N", "display": "Next-of-Kin"}]}],
                            "name": {"given": ["Marcus"], "family": "Whitfield"},
                            "telecom": [{"system": "phone", "value": "617-555-0143"}]}]}
    mother = {"resourceType": "RelatedPerson", "id": "r1", "patient": {"reference": "urn:uuid:p1"},
              "name": [{"given": ["Ruth"], "family": "Okonkwo"}]}
    clinician = {"resourceType": "Practitioner", "id": "dr1",
                 "name": [{"prefix": ["Dr."], "given": ["Eleanor"], "family": "Vasquez"}]}
    clinic = {"resourceType": "Organization", "id": "org1", "name": "Riverside Women's Health Clinic",
              "address": [{"line": ["200 Harbor Street"], "city": "Quincy", "state": "MA"}]}
    encounter = {**ENCOUNTER, "subject": {"reference": "urn:uuid:p1"},
                 "participant": [{"individual": {"reference": "Practitioner/dr1", "display": "Dr. Eleanor Vasquez"}}],
                 "serviceProvider": {"reference": "Organization/org1", "display": "Riverside Women's Health Clinic"}}
    note = {"resourceType": "DocumentReference", "id": "n1", "subject": {"reference": "urn:uuid:p1"},
            "type": {"coding": [{"system": "http://loinc.org", "code": "34117-2", "display": "History and physical note"}]},
            "date": "2024-03-18T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(PLANTED_NOTE.encode()).decode()}}]}
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": "urn:uuid:p1", "resource": patient}] +
                     [{"resource": r} for r in (mother, clinician, clinic, encounter, note)]}


def test_notes_lose_relatives_clinicians_organisations_addresses_and_identifiers(tmp_path):
    from pmlm.common.assemble.render import PatientContext, PromptParams, render

    (tmp_path / "b.json").write_text(json.dumps(_identified_bundle()))
    (timeline,), quarantined = _read(tmp_path)
    assert not quarantined
    [note] = [e.value for e in timeline.events if e.kind == "note"]
    prompt = render(PatientContext(notes=[note]), PromptParams(notes=True))
    text = "\n".join(m["content"] for m in prompt.messages)
    assert "<<record>>" in text or "Fundal height" in text  # the note is in the prompt
    for planted in ("Ann", "Lee", "Marcus", "Whitfield", "Ruth", "Okonkwo", "Vasquez", "Riverside", "Women's Health",
                    "Harbor", "Maple", "Quincy", "02169", "617-555", "QX99812", "999-12-3456", "marcus.w",
                    "example.net", "ehr.example.org", "March 4", "2024"):
        assert planted not in note, planted
        assert planted not in text, planted
    for kept in ("Prenatal visit", "husband", "Mother", "Fundal height 24 cm", "fetal heart tones present",
                 "blood pressure 118/76", "no proteinuria", "brown discharge", "glucose tolerance test"):
        assert kept in note, kept
    assert "[name]" in note and "[organisation]" in note and "[address]" in note and "[date]" in note


def test_pattern_scrubbing_without_a_record_to_name_names():
    from pmlm.client.ingest.deidentify import scrub

    text = ("Dr. Amara Patel called her daughter, Lucy, at (508) 555-0188 on 12 June 2023; "
            "visit at 9 Elm Rd, Apt 4; PO Box 77; record number 4411820; see www.example.com. "
            "Gestational diabetes screen normal; may resume walking; 120/80 at 36 weeks; Hb 11.2.")
    cleaned = scrub(text)
    for gone in ("Amara", "Patel", "Lucy", "555-0188", "12 June 2023", "Elm", "Box 77", "4411820", "example.com"):
        assert gone not in cleaned, gone
    for kept in ("daughter", "Gestational diabetes screen normal", "may resume walking", "120/80 at 36 weeks",
                 "Hb 11.2"):
        assert kept in cleaned, kept
    assert scrub(cleaned) == cleaned  # scrubbing is stable: the tokens it writes are not scrubbed again


def _every_pattern(text: str) -> str:
    """The pattern layer with every pattern run on every text: what the cues may skip must change nothing."""
    from pmlm.client.ingest.deidentify import PATTERNS, _relation_name

    for regex, token, _ in PATTERNS:
        text = regex.sub(_relation_name if token is None else token, text)
    return text


def test_skipping_patterns_by_their_cues_removes_exactly_what_running_every_pattern_removes():
    import csv
    import itertools

    from pmlm.client.ingest.deidentify import Scrubber

    texts = ["Dr. Amara Patel called her daughter, Lucy, at (508) 555-0188 on 12 June 2023; PO Box 77; MRN A12345",
             "mrs. smith; MRN:QX99812; Policy no. 7781-22; www.EXAMPLE.org; Ann@Example.NET; SEPTEMBER 3rd, 2021",
             "FIANCÉ Bob Jones; Patient  ID  445512; record\nnumber 99812; 5 Maple Street, Quincy MA 02169",
             # non-ASCII letters IGNORECASE folds onto ASCII ones (long s, Kelvin sign): never skipped on a cue
             "S\u017fN 4471A", "dear \u212aid: mother Ann",
             "no identifiers here: Hb 11.2, 120/80 at 36 weeks, fundal height 24 cm"]
    csv.field_size_limit(2**26)
    with gzip.open(SAMPLE / "hospital_a" / "events.csv.gz", "rt", newline="") as f:
        texts += [row["value"] for row in itertools.islice(csv.DictReader(f), 20000) if row["kind"] == "note"]
    assert len(texts) > 100
    scrub = Scrubber()
    for text in texts:
        assert scrub(text) == _every_pattern(text), text[:200]


def test_reference_displays_of_clinical_resources_stay_in_notes():
    from pmlm.client.ingest.deidentify import RecordNames

    names = RecordNames()
    names.collect({"resourceType": "Encounter",
                   "reasonReference": [{"reference": "urn:uuid:c1", "display": "Normal pregnancy"}],
                   "participant": [{"individual": {"reference": "urn:uuid:d1", "display": "Priya Raman"}}],
                   "serviceProvider": {"reference": "urn:uuid:o1", "display": "Lakeside Birth Centre"}})
    cleaned = names.scrubber()("Normal pregnancy; Priya Raman from Lakeside Birth Centre; Dr. Raman agrees.")
    assert cleaned == "Normal pregnancy; [name] from [organisation]; Dr. [name] agrees."


def test_a_bundle_read_for_some_notes_scrubs_those_with_every_name_and_keeps_no_other_text():
    from pmlm.client.ingest.fhir import bundle_timelines

    bundle = _identified_bundle()
    second = {**bundle["entry"][-1]["resource"], "id": "n2", "date": "2024-05-01T10:00:00Z"}
    bundle["entry"].append({"resource": second})
    (every,), _ = bundle_timelines(bundle, "b.json")
    notes = [i for i, e in enumerate(every.events) if e.kind == "note"]
    assert len(notes) == 2 and all("Okonkwo" not in every.events[i].value for i in notes)
    (first_only,), _ = bundle_timelines(bundle, "b.json", note_text=lambda timeline: {notes[0]})
    assert first_only.events[notes[0]].value == every.events[notes[0]].value  # scrubbed with the bundle's names
    assert first_only.events[notes[1]].value is None
    (none,), _ = bundle_timelines(bundle, "b.json", note_text=False)
    assert [none.events[i].value for i in notes] == [None, None]
