import gzip

from pmlm.client.ingest import RecordReader
from pmlm.client.ingest.csv_events import write_csv_timelines

HEADER = "patient_id,time,kind,system,code,display,value,unit\n"


def test_csv_rows_become_timelines_and_bad_rows_are_quarantined(tmp_path):
    rows = [
        "p1,1990-01-01,patient,,female,,,",
        "p1,2024-01-02T10:00:00Z,encounter,http://snomed.info/sct,424619006,Prenatal visit,,",
        "p1,2024-01-02T10:00:00Z,observation,http://loinc.org,29463-7,Body Weight,70.5,kg",
        "p1,2024-01-01T09:00:00Z,condition,http://snomed.info/sct,72892002,Normal pregnancy,,",
        "p1,not-a-date,procedure,http://snomed.info/sct,1,x,,",
        "p1,2024-01-03,observation,http://loinc.org,29463-7,Body Weight,heavy,kg",
        "p1,2024-01-03,teleportation,http://snomed.info/sct,1,x,,",
        "p2,2024-01-03,procedure,http://snomed.info/sct,5880005,Physical exam,,",
        "p2,2024-01-03,procedure",
        ",2024-01-03,procedure,http://snomed.info/sct,5880005,Physical exam,,",
    ]
    (tmp_path / "events.csv").write_text(HEADER + "\n".join(rows) + "\n")
    reader = RecordReader(tmp_path)
    timelines = {t.patient_id: t for t in reader}
    reasons = {q.resource: q.reason for q in reader.quarantined}
    assert "unparseable date" in reasons["line 6"]
    assert "not numeric" in reasons["line 7"]
    assert "unknown kind" in reasons["line 8"]
    assert "wrong number of fields" in reasons["line 10"]
    assert "empty patient_id" in reasons["line 11"]
    p1 = timelines["p1"]
    assert p1.gender == "female" and p1.birth_date.year == 1990
    assert [e.kind for e in p1.events] == ["condition", "encounter", "observation"]  # sorted by time
    assert p1.events[2].value == 70.5
    assert len(timelines["p2"].events) == 1


def test_csv_without_required_columns_is_quarantined(tmp_path):
    (tmp_path / "x.csv").write_text("patient_id,when\np1,2024\n")
    reader = RecordReader(tmp_path)
    assert list(reader) == []
    assert "lacks columns" in reader.quarantined[0].reason


def test_fhir_to_csv_round_trip_keeps_every_event(synthea_bundles, tmp_path):
    original = {t.patient_id: t for t in RecordReader(synthea_bundles)}
    with gzip.open(tmp_path / "events.csv.gz", "wt", newline="") as f:
        write_csv_timelines(original.values(), f)
    reader = RecordReader(tmp_path)
    again = {t.patient_id: t for t in reader}
    assert reader.quarantined == []
    assert again.keys() == original.keys()
    for pid, t in original.items():
        a = again[pid]
        assert len(a.events) == len(t.events)
        assert a.birth_date == t.birth_date
        for x, y in zip(t.events, a.events):
            assert (x.kind, x.concept, x.time.replace(microsecond=0)) == (y.kind, y.concept, y.time)
            if isinstance(x.value, float):
                assert abs(x.value - y.value) < 1e-9


def test_a_site_read_for_prompts_scrubs_only_the_notes_a_prompt_shows(monkeypatch):
    """load_site(keep_timelines=True) keeps the text of her latest note up to each prediction point, scrubbed, and
    no other note's text: every prompt context is the same as with every note read, for fewer scrubs."""
    from pathlib import Path

    from pmlm.client.assemble.context import build_context
    from pmlm.client.ingest import csv_events
    from pmlm.client.sites import load_site
    from pmlm.common.profiles import load_profile

    clinic = Path(__file__).resolve().parents[1] / "data" / "sample" / "small_clinic_d"
    profile = load_profile("obgyn")
    scrubbed = []
    scrub = csv_events._SCRUB_NOTE
    monkeypatch.setattr(csv_events, "_SCRUB_NOTE", lambda text: scrubbed.append(text) or scrub(text))
    every = {t.patient_id: t for t in RecordReader(clinic)}
    every_scrubs = len(scrubbed)
    scrubbed.clear()
    site, kept = load_site("clinic", clinic, profile, keep_timelines=True, progress=False)
    assert 0 < len(scrubbed) < every_scrubs / 5
    kept = {t.patient_id: t for t in kept}
    shown = 0
    for example in site.examples:
        notes = build_context(example, profile, kept[example.patient_id]).notes
        assert notes == build_context(example, profile, every[example.patient_id]).notes
        shown += bool(notes)
    assert shown > len(site.examples) / 2  # the check compared real notes, not empty lists
    for pid, timeline in kept.items():  # the text left is scrubbed text, never the raw note
        for mine, full in zip(timeline.events, every[pid].events):
            assert mine.kind == full.kind and mine.value in (None, full.value)
