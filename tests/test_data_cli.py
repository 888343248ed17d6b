"""`pmlm data` commands, with counts checked against an independent count taken from the raw JSON."""

import json
import subprocess
import sys
from pathlib import Path

from pmlm.cli import main

PREDICTION_ENCOUNTERS = {"424441002", "424619006", "169762003", "183460006"}  # prenatal/postnatal/obstetric


def _raw_counts(folder):
    patients = encounters = pregnancies = 0
    for path in sorted(folder.glob("*.json")):
        for entry in json.loads(path.read_text())["entry"]:
            r = entry["resource"]
            if r["resourceType"] == "Patient":
                patients += 1
            elif r["resourceType"] == "Encounter" and r["type"][0]["coding"][0]["code"] in PREDICTION_ENCOUNTERS:
                encounters += 1
            elif r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "72892002":
                pregnancies += 1
    return patients, encounters, pregnancies


def test_validate_json_matches_an_independent_count(synthea_bundles, tmp_path):
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    for p in synthea_bundles.glob("*.json"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pmlm", "data", "validate", str(tmp_path), "--json"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    patients, encounters, pregnancies = _raw_counts(synthea_bundles)
    assert summary["patients"] == patients
    assert summary["prediction_points"] == encounters
    assert summary["pregnancies"] == pregnancies
    assert summary["events"] > 100 * patients
    assert [q["file"].endswith("broken.json") for q in summary["quarantined"]] == [True]
    assert "truncated" in summary["quarantined"][0]["reason"]


def test_validate_text_and_missing_dir(synthea_bundles, tmp_path, capsys):
    assert main(["data", "validate", str(synthea_bundles)]) == 0
    out = capsys.readouterr().out
    assert "patients" in out and "quarantined: none" in out
    assert main(["data", "validate", str(tmp_path / "nope")]) == 2
    assert "no such" in capsys.readouterr().err


def test_stats_reports_coverage_and_floors(synthea_bundles, capsys):
    assert main(["data", "stats", str(synthea_bundles), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0.8 < stats["coverage"] <= 1.0
    assert stats["targets_per_point"] > 2
    for floor in ("popularity", "timing"):
        assert set(stats["floors"][floor]) >= {"recall@5", "ndcg@5"}


def test_inspect_shows_the_pregnancy_view(synthea_bundles, capsys):
    from pmlm.client.ingest import RecordReader
    from pmlm.client.examples import pregnancies
    from pmlm.common.profiles import load_profile

    profile = load_profile()
    pregnant = next(t for t in RecordReader(synthea_bundles) if pregnancies(t, profile))
    assert main(["data", "inspect", str(synthea_bundles), "--patient", pregnant.patient_id]) == 0
    out = capsys.readouterr().out
    assert "pregnancies:" in out and "prenatal visit" in out and "next 84 days:" in out and "GA " in out
    assert main(["data", "inspect", str(synthea_bundles), "--patient", "nobody"]) == 2
    # --data DIR, the old spelling, still works (hidden from --help); DIR twice or not at all is an error
    assert main(["data", "inspect", "--data", str(synthea_bundles), "--patient", pregnant.patient_id]) == 0
    assert capsys.readouterr().out == out
    assert main(["data", "inspect", "--patient", pregnant.patient_id]) == 2
    assert "needs DIR" in capsys.readouterr().err
    assert main(["data", "inspect", str(synthea_bundles), "--data", str(synthea_bundles), "--patient", "x"]) == 2


def test_inspect_pregnant_lists_women_pregnant_at_their_last_visit(tmp_path, capsys):
    """The visit `pmlm advise` answers for is her last prediction point: listed only if it is in a pregnancy."""
    from datetime import datetime, timedelta, timezone

    from conftest import SNOMED, pregnant_woman_rows, write_events_csv

    born, start = datetime(1990, 1, 1, tzinfo=timezone.utc), datetime(2025, 1, 1, tzinfo=timezone.utc)
    prenatal = ("424619006", "Prenatal visit")

    def visit(pid, day, code=prenatal):
        return [pid, (start + timedelta(days=day)).isoformat(), "encounter", SNOMED, *code, "", "", "", "AMB"]

    rows = [*pregnant_woman_rows("pregnant", born, start), visit("pregnant", 70), visit("pregnant", 126),
            *pregnant_woman_rows("delivered", born, start), visit("delivered", 70),
            visit("delivered", 300, ("169762003", "Postnatal visit")),
            # the record keeps her pregnancy open after a termination, as the generator's records can
            *pregnant_woman_rows("terminated", born, start), visit("terminated", 70),
            ["terminated", (start + timedelta(days=80)).isoformat(), "procedure", SNOMED, "714812005",
             "Termination of pregnancy", "", "", "", ""], visit("terminated", 120),
            ["never", born.isoformat(), "patient", "", "female", "", "", "", "", ""], visit("never", 70)]
    write_events_csv(tmp_path / "clinic", rows)
    assert main(["data", "inspect", str(tmp_path), "--pregnant"]) == 0
    out = capsys.readouterr().out
    listed = [line.split() for line in out.splitlines() if line.startswith("clinic ")]
    assert [row[:3] for row in listed] == [["clinic", "pregnant", "20"]]  # week 18 after conception + 2
    assert "pmlm advise --site out/demo/work/sites/clinic --patient pregnant" in out
    write_events_csv(tmp_path / "clinic", rows[4:])  # nobody pregnant at her last visit
    assert main(["data", "inspect", str(tmp_path), "--pregnant"]) == 1
    assert "no patient is pregnant" in capsys.readouterr().out


def test_inspect_pregnant_on_the_sample(capsys):
    """The README's first run copies an id from this list into `pmlm advise`: each must be pregnant at the visit
    advise uses (her last prediction point), checked here against her pregnancy episodes directly."""
    from pmlm.client.examples import pregnancies
    from pmlm.client.ingest import RecordReader
    from pmlm.common.profiles import load_profile

    site = Path(__file__).resolve().parents[1] / "data" / "sample" / "hospital_a"
    assert main(["data", "inspect", str(site), "--pregnant", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if line.startswith("hospital_a ")}
    assert len(listed) == 3, out
    profile = load_profile()
    for timeline in RecordReader(site):
        if timeline.patient_id in listed:
            last = max(e.time for e in timeline.events
                       if e.kind == "encounter" and e.concept in profile.prediction_points)
            episode = next(p for p in pregnancies(timeline, profile)
                           if p.start <= last and (p.end is None or last <= p.end))
            ends = set().union(*profile.stage_enders.values())  # a delivery or a loss (the profile's stages)
            assert not [e for e in timeline.events if episode.start <= e.time <= last and e.concept in ends]
            assert listed[timeline.patient_id] > 0
    assert "--patient " in out.splitlines()[-1] and out.splitlines()[-1].split()[-1] in listed


def test_stats_shows_each_site_and_the_pool(synthea_bundles, tmp_path, capsys):
    """Two sites made of the same few women: per-site counts add up to the pooled ones, each site has its own
    floors (null, not NaN, where it has no test point), and the text output has a row per site."""
    files = sorted(synthea_bundles.glob("*.json"))
    for i, path in enumerate(files):
        site = tmp_path / ("hospital_x" if i < len(files) - 1 else "small_clinic_y")
        site.mkdir(exist_ok=True)
        (site / path.name).write_bytes(path.read_bytes())
    (tmp_path / "empty_clinic").mkdir()  # not a site: no records
    assert main(["data", "stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats["sites"]) == {"hospital_x", "small_clinic_y"}
    for key in ("patients", "patients_with_points", "pregnancies", "prediction_points", "test_points", "test_patients"):
        assert sum(s[key] for s in stats["sites"].values()) == stats[key], key
    assert stats["sites"]["small_clinic_y"]["patients"] == 1
    for s in stats["sites"].values():
        assert s["train_points"] <= s["prediction_points"] and s["patients_with_points"] <= s["patients"]
        for floors in (s["floors"], s["floors_consortium_train"]):
            assert set(floors) == {"popularity", "timing"}
            for m in floors.values():
                assert m["points"] == s["test_points"]
                assert (m["recall@5"] is None) == (s["test_points"] == 0)
    assert main(["data", "stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per site" in out and "timing (all sites)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in
            (["hospital_x"], ["small_clinic_y"], ["pooled"])}
    assert set(rows) == {"hospital_x", "small_clinic_y", "pooled"}
    assert int(rows["pooled"][1]) == stats["patients"] and int(rows["small_clinic_y"][1]) == 1
