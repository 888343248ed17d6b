"""On-site refinement of the consortium's prompt policy (#17): kept only when the site's validation points score
higher, written only in the site directory, never sent nor charged; `pmlm advise` and `pmlm serve` use it."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from fake_llm import FakeOpenAIServer, Reply, chat_body, serving

from pmlm.cli import main
from pmlm.client.assemble.assembler import (
    CONSORTIUM,
    SITE_REFINED,
    PromptAssembler,
    SiteArtifacts,
    read_policy,
    save_policy,
)
from pmlm.client.egress import PUBLIC_FIELDS
from pmlm.client.examples import patient_split
from pmlm.client.phase_a import SitePhaseA
from pmlm.client.refine import RefineConfig, refine_site_policy, site_records
from pmlm.client.site_config import SiteConfig
from pmlm.client.train import model_state
from pmlm.common.assemble.policy import PromptPolicy, initial_bias
from pmlm.common.assemble.render import FORMATS, INITIAL
from pmlm.common.phase_a import PhaseAConfig, new_model
from pmlm.common.privacy import GaussianRelease, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import LEDGER_PATH, POLICY, SITE_POLICY, SITE_REFINEMENT

SNOMED = "http://snomed.info/sct"
WOMEN = [f"w{i:03d}" for i in range(40)]  # 28 train, 7 validation, 5 test patients by patient_split
# What a woman of these records really has next: named in an answer, it scores F1 1.
TRUTH = "- Prenatal visit\n- Auscultation of fetal heart"
LISTING_FORMAT = FORMATS[0].split(",")[0]  # "Answer with one bullet per expected care event"
SMALL = RefineConfig(points_per_round=8, min_train_patients=8, min_val_patients=4, max_calls=400, lr=20.0)


def write_records(folder: Path) -> None:
    """Each woman: a pregnancy with a prenatal visit and a fetal heart auscultation every 4 weeks."""
    folder.mkdir(parents=True)
    rows = []
    for w, pid in enumerate(WOMEN):
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=5 * w)
        rows.append([pid, datetime(1990 + w % 12, 3, 1, tzinfo=timezone.utc).isoformat(), "patient", "", "female",
                     "", "", "", "", ""])
        rows.append([pid, start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
                     (start + timedelta(days=266)).isoformat(), ""])
        for v in range(5):
            t = (start + timedelta(days=42 + 28 * v)).isoformat()
            code = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, t, "encounter", SNOMED, *code, "", "", "", "AMB"])
            rows.append([pid, t, "procedure", SNOMED, "225158009", "Auscultation of fetal heart", "", "", "", ""])
    with open(folder / "events.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end",
                         "encounter_class"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A site after phases A and C: an (untrained) global recommender, the consortium's policy at the initial
    prompt, a ledger with one release; its records read once."""
    root = tmp_path_factory.mktemp("refine")
    write_records(root / "records")
    site_dir = root / "site"
    SiteConfig("site-r", str(root / "records"), "obgyn").save(site_dir)
    cfg = PhaseAConfig(dim=16, run_name="run-1")
    profile = load_profile("obgyn")
    torch.manual_seed(0)
    SitePhaseA("site-r", root / "records", site_dir, cfg, examples=[]).store_global(
        model_state(new_model(cfg, profile)), 1, "run-1")
    consortium = PromptPolicy(cfg.dim)
    initial_bias(consortium, INITIAL, strength=2.0)
    save_policy(consortium, site_dir, {"run_id": "run-1"})
    SiteLedger(site_dir, "site-r").release("phase_c", GaussianRelease(20.0, 1.0), lambda: None, round=0)
    examples, timelines = site_records(SiteConfig.load(site_dir), profile)
    assert sum(patient_split(w) == "val" for w in WOMEN) == 7
    return {"root": root, "site": site_dir, "examples": examples, "timelines": timelines}


@pytest.fixture
def site(made, tmp_path):
    """A fresh copy of the made site for each test (refinement writes into it)."""
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(made["site"], copy)
    return {**made, "site": copy, "root": tmp_path, "records": made["root"] / "records"}


@dataclass
class Answer:
    text: str
    cached: bool = False


class FormatLLM:
    """Stand-in LLM: names her next care only when asked for one bullet per expected event (format 0); the
    consortium's prompt asks otherwise. `listing=False`: it never does, whatever the prompt."""

    def __init__(self, listing: bool = True):
        self.listing = listing
        self.prompts: list[str] = []

    def chat(self, messages, **sampling):
        text = "\n".join(m["content"] for m in messages)
        self.prompts.append(text)
        return Answer(TRUTH if self.listing and LISTING_FORMAT in text else "Rest and eat well.")


def files_under(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_refined_policy_is_kept_when_validation_scores_higher(site):
    records_before = files_under(site["records"])
    assert records_before  # the site's records, which refinement reads and must leave as they were
    ledger_before = (site["site"] / LEDGER_PATH).read_bytes()
    llm = FormatLLM()
    result = refine_site_policy(site["site"], llm, examples=site["examples"], timelines=site["timelines"],
                                config=SMALL)
    assert result.policy == SITE_REFINED, result.reason
    assert result.validation["refined"]["f1"] > result.validation[CONSORTIUM]["f1"]
    assert result.validation[CONSORTIUM]["f1"] == 0.0  # the consortium's prompt never gets her care named
    assert result.val_patients == 7 and result.train_patients == 28
    assert 0 < result.calls <= SMALL.max_calls and result.calls == len(set(llm.prompts))
    # Stored as a site-only artifact with its figures and the consortium policy it started from.
    refined, meta = read_policy(site["site"], SITE_POLICY)
    assert meta["source"] == SITE_REFINED and meta["validation"]["refined"]["f1"] == result.validation["refined"]["f1"]
    assert meta["consortium_sha256"] == hashlib.sha256((site["site"] / POLICY).read_bytes()).hexdigest()
    record = json.loads((site["site"] / SITE_REFINEMENT).read_text())
    assert record["policy"] == SITE_REFINED and record["calls"] == result.calls
    # The site's prompts now come from it; the consortium's stays where it was, unchanged.
    artifacts = SiteArtifacts.load(site["site"], load_profile("obgyn"))
    assert artifacts.policy_source == SITE_REFINED and artifacts.consortium_policy is not None
    assembler = PromptAssembler(artifacts)
    ex = next(e for e in site["examples"] if e.split == "test" and e.targets)
    _, state = assembler.context(ex, None)
    assert assembler.refined_params(state).format == 0
    assert assembler.refined_params(state, consortium=True) == INITIAL
    # Nothing was charged or sent: the ledger is byte for byte what it was, no egress line was written.
    assert (site["site"] / LEDGER_PATH).read_bytes() == ledger_before
    assert not (site["site"] / "egress.jsonl").exists()
    assert files_under(site["records"]) == records_before


def test_the_consortium_policy_stays_when_validation_does_not_improve(site):
    llm = FormatLLM(listing=False)  # no prompt gets her care named: nothing to gain
    result = refine_site_policy(site["site"], llm, examples=site["examples"], timelines=site["timelines"],
                                config=SMALL)
    assert result.policy == CONSORTIUM and "did not score higher" in result.reason
    assert result.validation["refined"]["f1"] == result.validation[CONSORTIUM]["f1"] == 0.0
    assert not (site["site"] / SITE_POLICY).exists()
    assert json.loads((site["site"] / SITE_REFINEMENT).read_text())["policy"] == CONSORTIUM
    assert SiteArtifacts.load(site["site"], load_profile("obgyn")).policy_source == CONSORTIUM


def test_with_a_keep_level_a_validation_gain_from_one_patient_is_noise(site, monkeypatch):
    """With keep_level, a validation gain that one patient's points carry is noise (a bootstrap over patients
    leaves her out about a third of the time) and the consortium policy stays; one point of every patient gaining
    is kept. Without it (the default), a higher validation mean is enough."""
    from pmlm.client import refine

    real = refine.score_policies

    def scored(winners):
        def score_policies(policies, points, *args):
            scores = real(policies, points, *args)
            lucky = winners(points)
            for name, wins in ((CONSORTIUM, set()), ("refined", lucky)):
                scores[name]["f1_by_point"] = [1.0 if i in wins else 0.0 for i in range(len(points))]
                scores[name]["f1"] = len(wins) / len(points)
            return scores
        return score_policies

    def one_patient(points):
        first = points[0].example.patient_id
        return {i for i, p in enumerate(points) if p.example.patient_id == first}

    strict = replace(SMALL, keep_level=0.8)
    monkeypatch.setattr(refine, "score_policies", scored(one_patient))
    result = refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"],
                                config=strict)
    gain = result.validation["refined_minus_consortium"]
    assert gain["difference"] > 0 and gain["difference_interval"][0] <= 0
    assert result.policy == CONSORTIUM and "inside the noise" in result.reason and "(80%)" in result.reason
    assert not (site["site"] / SITE_POLICY).exists()
    assert "f1_by_point" not in json.dumps(json.loads((site["site"] / SITE_REFINEMENT).read_text()))
    result = refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"],
                                config=SMALL)
    assert result.policy == SITE_REFINED, result.reason

    def one_point_each(points):
        first = {}
        for i, p in enumerate(points):
            first.setdefault(p.example.patient_id, i)
        return set(first.values())

    monkeypatch.setattr(refine, "score_policies", scored(one_point_each))
    result = refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"],
                                config=strict)
    assert result.validation["refined_minus_consortium"]["difference_interval"][0] > 0
    assert result.policy == SITE_REFINED, result.reason


def test_a_later_refinement_that_does_not_improve_removes_the_earlier_one(site):
    refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"], config=SMALL)
    assert (site["site"] / SITE_POLICY).exists()
    refine_site_policy(site["site"], FormatLLM(listing=False), examples=site["examples"],
                       timelines=site["timelines"], config=SMALL)
    assert not (site["site"] / SITE_POLICY).exists()


def test_a_site_with_too_few_patients_keeps_the_consortium_policy_without_asking_the_llm(site):
    llm = FormatLLM()
    result = refine_site_policy(site["site"], llm, examples=site["examples"], timelines=site["timelines"],
                                config=replace(SMALL, min_val_patients=10))  # the default; this site has 7
    assert result.policy == CONSORTIUM and "too few" in result.reason and "7 validation patients" in result.reason
    assert llm.prompts == [] and result.calls == 0
    assert not (site["site"] / SITE_POLICY).exists()


def test_a_budget_too_small_to_train_asks_the_llm_nothing(site):
    llm = FormatLLM()
    result = refine_site_policy(site["site"], llm, examples=site["examples"], timelines=site["timelines"],
                                config=replace(SMALL, max_calls=30, val_points=8))  # 16 to validate, 14 left
    assert result.policy == CONSORTIUM and "cannot pay" in result.reason and llm.prompts == []


def test_refinement_stays_within_its_call_budget(site):
    llm = FormatLLM()
    config = replace(SMALL, max_calls=60, val_points=10)
    result = refine_site_policy(site["site"], llm, examples=site["examples"], timelines=site["timelines"],
                                config=config)
    assert result.calls <= 60 and len(set(llm.prompts)) == result.calls and result.rounds >= 2


def test_refinement_writes_only_in_the_site_directory_and_adds_no_message(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    data = Path(SiteConfig.load(site["site"]).data_dir)
    before = {"records": files_under(data), "cwd": files_under(outside)}
    site_before = files_under(site["site"])
    refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"], config=SMALL)
    assert files_under(data) == before["records"] and files_under(outside) == before["cwd"]
    changed = {k for k, v in files_under(site["site"]).items() if site_before.get(k) != v}
    assert changed == {str(SITE_POLICY), str(SITE_REFINEMENT)}
    # No Flower message carries it: the egress allow-list has no refinement field, no handler sends one.
    assert not any("refine" in message or "on_site" in message for message in PUBLIC_FIELDS)
    app_source = (Path(__file__).resolve().parents[1] / "client" / "client_app.py").read_text()
    assert "refine" not in app_source


def test_a_refined_policy_from_an_earlier_consortium_policy_is_not_used(site):
    refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"], config=SMALL)
    newer = PromptPolicy(16)
    initial_bias(newer, INITIAL, strength=3.0)
    save_policy(newer, site["site"], {"run_id": "run-2"})  # a new phase C run stored another consortium policy
    artifacts = SiteArtifacts.load(site["site"], load_profile("obgyn"))
    assert artifacts.policy_source == CONSORTIUM
    assert any("earlier consortium policy" in note for note in artifacts.missing)


@pytest.fixture
def endpoint():
    with serving(FakeOpenAIServer()) as server:
        server.default = Reply(200, chat_body(text="- Prenatal visit"))
        yield server


def test_advise_and_serve_use_the_refined_policy_when_present(site, endpoint, capsys):
    config = SiteConfig.load(site["site"])
    config.llm = {"base_url": endpoint.base_url, "model": "fake-model", "max_retries": 0}
    config.save(site["site"])
    patient = next(w for w in WOMEN if patient_split(w) == "test")

    def advise() -> tuple[str, str]:
        assert main(["advise", "--site", str(site["site"]), "--patient", patient]) == 0
        asked = "\n".join(m["content"] for m in endpoint.requests[-1]["json"]["messages"])
        return asked, capsys.readouterr().err

    asked, err = advise()
    assert LISTING_FORMAT not in asked and f"chosen by the {CONSORTIUM} policy" in err
    refine_site_policy(site["site"], FormatLLM(), examples=site["examples"], timelines=site["timelines"], config=SMALL)
    asked, err = advise()
    assert LISTING_FORMAT in asked and f"chosen by the {SITE_REFINED} policy" in err
    assert (site["site"] / "llm_cache").is_dir()  # advise asked through the site's own cache

    from pmlm.client.grpc_service import PromptServicer, SiteState
    from pmlm.v1 import prompt_service_pb2 as prompt_pb

    state = SiteState(site["site"])
    try:
        reply = PromptServicer(state)._assemble(prompt_pb.AssemblePromptRequest(patient_id=patient))
        status = PromptServicer(state).GetSiteStatus(prompt_pb.GetSiteStatusRequest(), None)
    finally:
        state.close()
    assert reply.policy == SITE_REFINED and reply.refined_by_policy
    assert LISTING_FORMAT in "\n".join(m.content for m in reply.messages)
    assert ("on_site", str(SITE_POLICY)) in [(a.phase, a.path) for a in status.artifacts]


def test_refinement_opens_the_site_llm_and_reads_the_records_itself(site, endpoint):
    """`python -m pmlm.client.refine SITE_DIR`: the site's own LLM (through its cache) and records."""
    from pmlm.client.refine import main as refine_main

    config = SiteConfig.load(site["site"])
    config.llm = {"base_url": endpoint.base_url, "model": "fake-model", "max_retries": 0}
    config.save(site["site"])
    assert refine_main([str(site["site"]), "--min-train-patients", "8", "--min-val-patients", "4",
                        "--max-calls", "60", "--val-points", "8"]) == 0
    record = json.loads((site["site"] / SITE_REFINEMENT).read_text())
    assert record["policy"] == CONSORTIUM and record["train_patients"] == 28  # one answer for every prompt
    assert record["llm_calls"] == record["calls"] == len(endpoint.requests) > 0
    assert (site["site"] / "llm_cache").is_dir()
