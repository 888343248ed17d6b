"""#20: a reduced `pmlm evaluate --profile chronic` end to end (three sites of a few in-memory chronic records, the
real Flower app, a fake LLM): every key of the report contract, several points a patient, no obstetric wording."""

import gzip
import itertools
import json
import math
import re

import pytest

from chronic_records import chronic_timeline
from fake_llm import FakeOpenAIServer, serving
from pmlm.cli import main
from pmlm.client.examples import patient_split
from pmlm.client.ingest.csv_events import write_csv_timelines
from test_profile_scope import OBSTETRIC

SITES = ("hospital_a", "hospital_b", "hospital_c")
VARIANTS = {"general", "summary_only", "self", "peer", "self_peer", "pmlm_consortium", "pmlm", "oracle"}


def _ids(site: str, split: str, n: int) -> list[str]:
    """The first n ids of a site that the split hash puts on `split` (so each site surely has test patients)."""
    candidates = (f"{site}-{i}" for i in itertools.count())
    return list(itertools.islice((p for p in candidates if patient_split(p) == split), n))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("chronic")
    for site in SITES:
        ids = _ids(site, "train", 5) + _ids(site, "test", 2)
        timelines = [chronic_timeline(pid, gender=("male", "female")[i % 2]) for i, pid in enumerate(ids)]
        (root / site).mkdir()
        with gzip.open(root / site / "events.csv.gz", "wt", newline="") as f:
            write_csv_timelines(timelines, f)
    out = root / "out"
    # The answer names two of the records' events (a lipid panel, a check-up): some variants score above 0.
    with serving(FakeOpenAIServer(text="- Order a lipid panel.\n- Book a general examination.")) as llm:
        code = main(["evaluate", "--profile", "chronic", "--data", str(root), "--out", str(out),
                     "--llm-base-url", llm.base_url, "--llm-model", "fake-model", "--max-test-points", "9",
                     "--points-per-patient", "2", "--rounds", "1", "--phase-c-rate", "0.5", "--refine-calls", "20"])
        prompts = [m["content"] for r in llm.requests for m in r["json"]["messages"]]
    assert code == 0
    return json.loads((out / "report.json").read_text()), prompts, out


def test_reduced_chronic_evaluate_reports_every_key(report):
    report, _, out = report
    data = report["data"]
    assert data["profile"] == "chronic" and data["sites"] == 3 and data["patients"] == 21
    # 2 test patients a site, 2 points each, capped at 9: more points than patients, and the cap holds.
    assert data["test_points"] == 9 and data["test_patients"] == 6
    privacy = report["privacy"]
    assert set(privacy["sites"]) == set(SITES)
    for site in privacy["sites"].values():
        assert 0 < site["epsilon"] <= site["budget"] == 3.0 and site["releases"] > 0
        assert set(site["by_phase"]) == {"phase_a", "phase_b", "phase_c"}
    assert set(report["recommender"]) == {"federated_dp", "popularity", "timing", "peer_profile", "centralized",
                                          "local_only"}
    for row in report["recommender"].values():
        assert set(row) == {"recall@5", "ndcg@5", "auroc"} and 0 <= row["recall@5"] <= 1
    assert set(report["recommender_by_site"]["sites"]) == set(SITES)
    assert set(report["guidance"]) == VARIANTS
    for row in report["guidance"].values():
        assert set(row) == {"precision", "recall", "f1", "risk_recall", "f1_interval", "points"}
        low, high = row["f1_interval"]
        assert row["points"] == 9 and 0 <= low <= row["f1"] + 1e-9 <= high + 2e-9 <= 1 + 2e-9
    assert report["guidance"]["oracle"]["f1"] > 0
    by_site = report["guidance_by_site"]
    assert set(by_site) == set(SITES) and sum(t["pmlm"]["points"] for t in by_site.values()) == 9
    for pair in report["guidance_paired"].values():
        low, high = pair["difference_interval"]
        assert low <= pair["difference"] + 1e-9 <= high + 2e-9 and pair["points"] == 9
        assert set(pair["by_site"]) == set(SITES)
    assert set(report["on_site"]["prompt_policy"]) == set(SITES) and set(report["on_site"]["recommender"]) == set(SITES)
    assert report["llm"]["model"] == "fake-model" and report["llm"]["calls"] > 0
    assert set(report["runtime_s"]) == {"total", "phase_a", "phase_b", "phase_c", "evaluation"}
    assert report["privacy_utility_curve"][0]["epsilon"] == 3.0
    # The report's examples are headed by the profile's clock (age), not a gestational week.
    assert report["examples"] and all(ex["stage"].startswith("age ") and "gestational_week" not in ex
                                      for ex in report["examples"])
    assert not math.isnan(report["recommender"]["federated_dp"]["auroc"])
    assert "9 points of 6 test patients" in (out / "report.html").read_text()


def test_no_chronic_prompt_or_report_text_is_obstetric(report):
    report, prompts, out = report
    found = [(m.group(0), p[max(0, m.start() - 200):m.end() + 100]) for p in prompts if (m := OBSTETRIC.search(p))]
    assert prompts and not found, found[:2]
    assert "primary care" in prompts[0] or any("primary care" in p for p in prompts)
    shown = json.dumps(report["examples"]) + (out / "report.html").read_text()
    assert not OBSTETRIC.search(shown), OBSTETRIC.search(shown)
    # The page's own labels assume no woman (a woman's prompts and answers, in <pre>, may say "her").
    labels = re.sub(r"<pre>.*?</pre>", "", (out / "report.html").read_text(), flags=re.S)
    assert "Checked against" in labels and not re.search(r"\b(her|she)\b", labels, re.I)


def test_data_validate_reads_a_chronic_consortium_in_words(tmp_path, capsys):
    """The text summary counts pregnancies only where the profile has them (it failed on a chronic one)."""
    (tmp_path / "clinic").mkdir()
    with gzip.open(tmp_path / "clinic" / "events.csv.gz", "wt", newline="") as f:
        write_csv_timelines([chronic_timeline("a"), chronic_timeline("b", gender="female")], f)
    assert main(["data", "validate", "--profile", "chronic", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 patients" in out and "prediction points (profile chronic)" in out and "pregnan" not in out
