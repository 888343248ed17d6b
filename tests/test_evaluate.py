"""A reduced `pmlm evaluate` on a slice of the sample consortium: every report key, real LLM, real Flower app."""

import gzip
import itertools
import json
import math

import pytest

from pmlm.cli import main
from pmlm.client.ingest import RecordReader
from pmlm.client.ingest.csv_events import write_csv_timelines

from conftest import SAMPLE


@pytest.fixture(scope="module")
def small_consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("consortium")
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        timelines = list(itertools.islice(RecordReader(SAMPLE / site), 40))
        (root / site).mkdir()
        with gzip.open(root / site / "events.csv.gz", "wt", newline="") as f:
            write_csv_timelines(timelines, f)
    return root


def test_reduced_evaluate_reports_every_key(small_consortium, tmp_path):
    out = tmp_path / "report.json"
    code = main(["evaluate", "--data", str(small_consortium), "--workdir", str(tmp_path / "work"),
                 "--json-out", str(out), "--html-out", str(tmp_path / "report.html"), "--max-test-points", "4",
                 "--rounds", "1", "--phase-c-rounds", "1", "--phase-c-episodes", "3", "--no-trained-baselines"])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["data"]) >= {"patients", "sites", "prediction_points", "test_points"}
    assert report["data"]["sites"] == 3 and report["data"]["patients"] == 120 and report["data"]["test_points"] == 4
    privacy = report["privacy"]
    assert privacy["delta"] == 1e-5 and set(privacy["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    for site in privacy["sites"].values():
        assert 0 < site["epsilon"] <= site["budget"] == 3.0
        assert set(site["by_phase"]) == {"phase_a", "phase_b", "phase_c"} and all(site["by_phase"].values())
    assert set(report["recommender"]) >= {"federated_dp", "popularity", "timing", "peer_profile"}
    for row in report["recommender"].values():
        assert set(row) == {"recall@5", "ndcg@5", "auroc"} and 0 <= row["recall@5"] <= 1
    assert set(report["guidance"]) == {"general", "summary_only", "self", "peer", "self_peer", "pmlm", "oracle"}
    for row in report["guidance"].values():
        assert set(row) == {"precision", "recall", "f1", "risk_recall"}
        assert 0 <= row["f1"] <= 1
    assert report["llm"]["calls"] > 0 and "model" in report["llm"] and "cached" in report["llm"]
    assert set(report["runtime_s"]) == {"total", "phase_a", "phase_b", "phase_c", "evaluation"}
    # The ceiling is above the no-data prompt, and personalisation does not do worse than no data.
    assert report["guidance"]["oracle"]["f1"] > report["guidance"]["general"]["f1"]
    assert report["guidance"]["pmlm"]["f1"] >= report["guidance"]["general"]["f1"]
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "Guidance F1" in html
    # The site directories stay usable by `pmlm advise`.
    site_dir = tmp_path / "work" / "sites" / "hospital_a"
    assert (site_dir / "site.json").exists() and (site_dir / "phase_b" / "peer_profiles.npz").exists()
    assert (site_dir / "phase_c" / "policy.pt").exists()
    assert not math.isnan(report["recommender"]["federated_dp"]["auroc"])
