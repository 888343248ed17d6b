"""A reduced `pmlm evaluate` on a slice of the sample consortium: every report key, real LLM, real Flower app."""

import contextlib
import gzip
import itertools
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pmlm.cli import main
from pmlm.client import phase_a, sampling
from pmlm.common.privacy.noise import SecureNormal
from pmlm.server import server_app
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


@contextlib.contextmanager
def seeded_run(seed: int = 0):
    """Every random draw of an in-process `pmlm evaluate` from fixed seeds: DP noise (phases B and C draw from the
    OS CSPRNG, phase A's DP-SGD from torch seeded by `secrets`), the sampling key, the run names, the global
    generators (model initialisation, SecAgg+'s stochastic rounding). The embedded LLM answers deterministically,
    so the run, and every figure the tests below compare, repeat exactly: no assertion here fails by chance."""
    noise = np.random.default_rng(seed)
    seeds, names = random.Random(seed), itertools.count()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SecureNormal, "normal", lambda self, loc=0.0, scale=1.0, size=None: noise.normal(loc, scale, size))
        mp.setattr(phase_a, "secrets", SimpleNamespace(randbits=seeds.getrandbits))
        mp.setattr(sampling, "secrets", SimpleNamespace(token_bytes=lambda n: bytes(seeds.getrandbits(8) for _ in range(n))))
        mp.setattr(server_app, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex=f"seeded{next(names):06d}")))
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        yield


@pytest.fixture(scope="module")
def evaluated(small_consortium, tmp_path_factory):
    """One reduced run shared by the tests below (it is the slow part), seeded (see seeded_run)."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    out = tmp_path / "report.json"
    with seeded_run():
        code = main(["evaluate", "--data", str(small_consortium), "--workdir", str(tmp_path / "work"),
                     "--json-out", str(out), "--html-out", str(tmp_path / "report.html"), "--max-test-points", "12",
                     "--rounds", "2", "--phase-c-rounds", "1", "--phase-c-rate", "0.1", "--no-trained-baselines"])
    assert code == 0
    return tmp_path


def test_reduced_evaluate_reports_every_key(evaluated):
    tmp_path = evaluated
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["data"]) >= {"patients", "sites", "prediction_points", "test_points"}
    assert report["data"]["sites"] == 3 and report["data"]["patients"] == 120 and report["data"]["test_points"] == 12
    privacy = report["privacy"]
    assert privacy["delta"] == 1e-5 and set(privacy["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    for site in privacy["sites"].values():
        assert 0 < site["epsilon"] <= site["budget"] == 3.0
        assert set(site["by_phase"]) == {"phase_a", "phase_b", "phase_c"} and all(site["by_phase"].values())
    assert set(report["recommender"]) >= {"federated_dp", "popularity", "timing", "peer_profile"}
    for row in report["recommender"].values():
        assert set(row) == {"recall@5", "ndcg@5", "auroc"} and 0 <= row["recall@5"] <= 1
    variants = {"general", "summary_only", "self", "peer", "self_peer", "pmlm_consortium", "pmlm", "oracle"}
    assert set(report["guidance"]) == variants
    for row in report["guidance"].values():
        assert set(row) == {"precision", "recall", "f1", "risk_recall", "f1_interval", "points"}
        low, high = row["f1_interval"]
        assert 0 <= low <= row["f1"] + 1e-9 and row["f1"] <= high + 1e-9 and high <= 1 and row["points"] == 12
    # Per site: every site scored on its share of the points (round-robin), the same variants, its own intervals.
    by_site = report["guidance_by_site"]
    assert set(by_site) == set(privacy["sites"]) and sum(t["pmlm"]["points"] for t in by_site.values()) == 12
    assert all(set(t) == variants and t["pmlm"]["points"] >= 2 for t in by_site.values())  # ~4 each, fewer where
    # a site has fewer test patients (one point per patient)
    paired = report["guidance_paired"]
    assert set(paired) == {"pmlm_vs_self_peer", "pmlm_vs_pmlm_consortium", "pmlm_vs_general"}
    for pair in paired.values():
        low, high = pair["difference_interval"]
        assert low <= pair["difference"] + 1e-9 <= high + 2e-9 and pair["points"] == 12
        assert set(pair["by_site"]) == set(privacy["sites"])
    # Each site's own step after the federated run is on record, with the reason for what it kept; 40 women a site
    # is below refinement's minimum, so each keeps the consortium policy and "pmlm" prompts are the consortium's.
    refined = report["on_site"]["prompt_policy"]
    assert set(refined) == set(privacy["sites"])
    assert all(r["policy"] == "consortium" and "too few" in r["reason"] for r in refined.values())
    assert report["guidance"]["pmlm"]["f1"] == report["guidance"]["pmlm_consortium"]["f1"]
    assert report["llm"]["calls"] > 0 and "model" in report["llm"] and "cached" in report["llm"]
    assert set(report["runtime_s"]) == {"total", "phase_a", "phase_b", "phase_c", "evaluation"}
    # The ceiling is above the no-data prompt, and PMLM's prompt beats it: her data makes the LLM name her events.
    # (The run is seeded: these hold or fail for the code and data, not by chance.)
    assert report["guidance"]["oracle"]["f1"] > report["guidance"]["general"]["f1"]
    assert report["guidance"]["pmlm"]["f1"] > report["guidance"]["general"]["f1"]
    # The report's example answers carry the answer check's findings, as `pmlm advise` shows them.
    checks = [v["check"] for ex in report["examples"] for v in ex["variants"].values()]
    assert report["examples"] and all(isinstance(c, list) for c in checks)
    assert all(set(f) == {"item", "reasons", "removed"} and f["reasons"] for c in checks for f in c)
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "Guidance F1" in html and "Checked against the patient's prompt" in html
    # The site directories stay usable by `pmlm advise`.
    site_dir = tmp_path / "work" / "sites" / "hospital_a"
    assert (site_dir / "site.json").exists() and (site_dir / "phase_b" / "peer_profiles.npz").exists()
    assert (site_dir / "phase_c" / "policy.pt").exists()
    assert not math.isnan(report["recommender"]["federated_dp"]["auroc"])


def test_advise_uses_the_site_artifacts_evaluate_left(small_consortium, evaluated, tmp_path, capsys):
    """`pmlm advise` on a site directory: her prompt from the stored artifacts, the real LLM's answer, sources."""
    work = evaluated / "work"
    from pmlm.client.examples import build_examples
    from pmlm.common.profiles import load_profile

    profile = load_profile()
    patient = next(t for t in RecordReader(small_consortium / "hospital_a") if build_examples(t, profile))
    capsys.readouterr()
    site = work / "sites" / "hospital_a"
    assert main(["advise", "--site", str(site), "--patient", patient.patient_id, "--show-prompt"]) == 0
    out = capsys.readouterr().out
    assert "--- system ---" in out and "Guidance:" in out
    # The refined policy decides which sections she gets; at least one personal source is in her prompt.
    assert "[the patient's predictions]" in out or "[similar patients (DP peer profile)]" in out
    assert patient.patient_id not in out.split("Guidance:")[0]  # her id never enters the prompt
    assert main(["advise", "--site", str(site), "--patient", "nobody"]) == 2
    assert main(["advise", "--site", str(tmp_path), "--patient", patient.patient_id]) == 2
    assert "not a PMLM site directory" in capsys.readouterr().err


def test_each_phase_shows_a_progress_bar_from_the_round_markers(tmp_path, capsys):
    import logging
    from logging import INFO

    from flwr.common.logger import FLOWER_LOGGER, log

    from pmlm.pipeline.federation import PhaseProgress, quiet_flower
    from pmlm.pipeline.options import PipelineOptions

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.basicConfig(level=logging.INFO, force=True)  # as some libraries do: the round markers must not print
    try:
        quiet_flower()
        with PhaseProgress(PipelineOptions(data=tmp_path, workdir=tmp_path)) as progress:
            log(INFO, "[ROUND 1/3]")
            log(INFO, "[ROUND 2/3]")
            assert (progress.bars["A"].n, progress.bars["A"].total) == (1, 3)  # a round counts once it is done
            log(INFO, "[PMLM phase B] DP k-means, 6 prototypes, 2 rounds, then peer profiles")
            assert progress.bars["A"].n == 3  # phase B starting means phase A finished
            assert (progress.bars["B"].n, progress.bars["B"].total) == (0, 3)
            log(INFO, "[PMLM phase B] release 1/3 (centre) done")
            assert progress.bars["B"].n == 1
            log(INFO, "[PMLM phase C] RL prompt policy, 2 rounds")
            log(INFO, "[PMLM phase C] round 1/2 done, step size 0.5")
            assert progress.bars["B"].n == 3 and (progress.bars["C"].n, progress.bars["C"].total) == (1, 2)
        assert progress not in FLOWER_LOGGER.handlers
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
    printed = capsys.readouterr()
    assert "[ROUND" not in printed.err + printed.out and "PMLM phase" not in printed.err + printed.out


def test_paired_interval_resamples_the_points_together():
    """A constant gain of 0.1 on every point has a difference interval of exactly [0.1, 0.1] when the points are
    resampled together (unpaired resampling would give a wide one), and a ratio interval around 1.5."""
    from pmlm.common.metrics import paired_interval

    base = [0.1, 0.2, 0.3, 0.2, 0.4, 0.0, 0.2, 0.2]
    out = paired_interval([b + 0.1 for b in base], base)
    assert out["difference"] == pytest.approx(0.1) and out["points"] == 8
    assert out["difference_interval"] == pytest.approx([0.1, 0.1])
    assert out["ratio"] == pytest.approx(0.3 / 0.2) and out["ratio_interval"][0] > 1.0
    swapped = paired_interval(base, [b + 0.1 for b in base])
    assert swapped["difference_interval"][1] < 0
    assert math.isnan(paired_interval([], [])["difference"])


def test_a_paired_interval_counts_its_patients_and_reads_few_as_neither_way():
    from pmlm.common.metrics import MIN_PATIENTS_TO_TELL, paired_interval, paired_verdict

    base = [0.1 * (i % 7) for i in range(40)]
    few = paired_interval([b + 0.2 for b in base], base, patients=[f"p{i % 5}" for i in range(40)])
    assert few["patients"] == 5 and few["points"] == 40 and few["difference_interval"][0] > 0
    assert paired_verdict(few["difference"], few["difference_interval"], few["patients"]) == "too few patients to tell"
    many = paired_interval([b + 0.2 for b in base], base, patients=[f"p{i % 20}" for i in range(40)])
    assert many["patients"] == 20 >= MIN_PATIENTS_TO_TELL
    assert paired_verdict(many["difference"], many["difference_interval"], many["patients"]) == "gain"
    assert paired_verdict(many["difference"], many["difference_interval"]) == "gain"  # count unknown: old reports
