"""`pmlm data` commands, with counts checked against an independent count taken from the raw JSON."""

import json
import subprocess
import sys

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
    for floor in ("popularity", "gestational_timing"):
        assert set(stats["floors"][floor]) >= {"recall@5", "ndcg@5"}


def test_inspect_shows_the_pregnancy_view(synthea_bundles, capsys):
    from pmlm.client.ingest import RecordReader
    from pmlm.client.examples import pregnancies
    from pmlm.common.profiles import load_profile

    profile = load_profile()
    pregnant = next(t for t in RecordReader(synthea_bundles) if pregnancies(t, profile))
    assert main(["data", "inspect", "--data", str(synthea_bundles), "--patient", pregnant.patient_id]) == 0
    out = capsys.readouterr().out
    assert "pregnancies:" in out and "prenatal visit" in out and "next 84 days:" in out and "GA " in out
    assert main(["data", "inspect", "--data", str(synthea_bundles), "--patient", "nobody"]) == 2
