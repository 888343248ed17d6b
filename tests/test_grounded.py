"""Grounded advice (#21): predictions and peer facts that fit her stage, facts from her record that are true,
every answer checked against its prompt, and `pmlm advise` showing PMLM's checklist, then the checked prose,
then the notice naming the model.

The reported cases are here: a patient 6 weeks after delivery offered "augmentation of labor", "miscarriage in
the second trimester" and a peer line about prenatal visits; a patient at a prenatal visit told "no prenatal
visit for 5 weeks"; answers with 8 bullets where the prompt allows 5, restated history with changed times,
invented items, and "20%" where the prompt says 75%.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import SAMPLE
from fake_llm import FakeOpenAIServer, serving
from pmlm.cli import main
from pmlm.client.assemble import self_informed
from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
from pmlm.client.assemble.check import (advice_notice, care_checklist, check_answer, format_checklist,
                                        model_label)
from pmlm.client.assemble.self_informed import missed_visit
from pmlm.client.assemble.stage import her_stage
from pmlm.client.examples import Example, HistoryItem, build_examples
from pmlm.client.features import FeatureEncoder
from pmlm.client.ingest import RecordReader
from pmlm.client.llm import LLMConfig
from pmlm.client.reward import ConceptMatcher
from pmlm.client.site_config import SiteConfig
from pmlm.common.assemble.render import PatientContext, PromptParams, render
from pmlm.common.model import build_model
from pmlm.common.peer_profiles import PeerProfiles
from pmlm.common.profiles import load_profile

OBGYN = load_profile("obgyn")
ID = {c.name: c.id for c in OBGYN.concepts}
T = datetime(2025, 6, 1, tzinfo=timezone.utc)


def example(point: str, history: list[HistoryItem], *, gestational_week=None, weeks_postpartum=None) -> Example:
    return Example("p", T, ID[point], history, [], [], "test", gestational_week=gestational_week,
                   weeks_postpartum=weeks_postpartum, age_years=30.0)


def visit(name: str, days: float) -> HistoryItem:
    return HistoryItem(ID[name], "encounter", days)


def event(name: str, days: float, kind: str = "procedure") -> HistoryItem:
    return HistoryItem(ID[name], kind, days)


# -- 1. stage-consistent predictions and peer facts ------------------------------------------------------------


def ranked(profile, first: list[str]):
    """A stand-in for the recommender's probabilities: `first` in order, everything else far below."""
    def predict(model, examples, encoder):
        probs = np.linspace(0.05, 0.01, len(profile.concepts))
        for rank, name in enumerate(first):
            probs[profile.index[next(c.id for c in profile.concepts if c.name == name)]] = 0.9 - 0.1 * rank
        return probs[None, :]
    return predict


def assembler_for(profile, peer_rates: dict[str, float] | None = None) -> PromptAssembler:
    encoder = FeatureEncoder(profile, 16)
    model = build_model(profile, dim=16, max_history=16)
    peers = None
    if peer_rates:
        concepts = [c.id for c in profile.concepts]
        rates = np.zeros((1, len(concepts)))
        for name, rate in peer_rates.items():
            rates[0, concepts.index(next(c.id for c in profile.concepts if c.name == name))] = rate
        dim = model.embed(*encoder.encode([example("postnatal visit", [visit("postnatal visit", 0)])])[:2]).shape[-1]
        peers = PeerProfiles(np.eye(1, dim), np.array([300.0]), rates, np.array([False]), 1.0, concepts, 84, 20)
    artifacts = SiteArtifacts(profile, model=model, encoder=encoder, peers=peers)
    artifacts.recommender, artifacts.recommender_encoder = model, encoder  # where a site-adapted one would go
    return PromptAssembler(artifacts)


REPORTED_RANKING = ["augmentation of labor", "miscarriage in the second trimester", "depression screening",
                    "Pap smear", "prenatal visit", "seasonal flu vaccine", "hemogram", "Tdap vaccine",
                    "lipid panel"]


def six_weeks_after_delivery() -> Example:
    return example("postnatal visit", [visit("obstetric admission", 42), event("childbirth", 42),
                                       event("epidural anesthesia", 42), visit("postnatal visit", 0),
                                       event("depression screening", 0)], weeks_postpartum=6.0)


def test_reported_case_six_weeks_after_delivery_gets_no_labour_miscarriage_or_prenatal_items(monkeypatch):
    monkeypatch.setattr(self_informed, "predict", ranked(OBGYN, REPORTED_RANKING))
    assembler = assembler_for(OBGYN, {"prenatal visit": 0.8, "depression screening": 0.6, "physical examination": 0.5})
    assembled = assembler.assemble(six_weeks_after_delivery(), None)
    text = "\n".join(m["content"] for m in assembled.prompt.messages)
    assert "augmentation of labor" not in text and "miscarriage" not in text
    assert "prenatal visit" not in text  # neither as a prediction nor as a peer line
    # The next possible events take their places, and the peer section keeps its possible facts.
    assert [n for n, _ in assembled.prompt.predictions] == ["depression screening", "Pap smear",
                                                            "seasonal flu vaccine", "hemogram", "Tdap vaccine"]
    assert "about 60% had depression screening within 12 weeks" in assembled.prompt.peer_facts
    # Not silently: her notes say what was left out and why.
    assert assembled.stage.name == "postpartum" and assembled.stage.label == "after the end of her pregnancy (6 weeks ago)"
    note = next(m for m in assembled.missing if m.startswith("left out of the prompt"))
    assert "augmentation of labor (90%) [the patient's predictions]" in note
    assert "labour and delivery events cannot follow the end of her pregnancy" in note
    assert "miscarriage in the second trimester (80%)" in note
    assert "about 80% had prenatal visit within 12 weeks [similar patients (DP peer profile)]" in note
    assert "6 weeks after the end of her pregnancy" in text
    # The checklist shows the same: her predicted care, peers, and what was left out.
    shown = format_checklist(care_checklist(assembled))
    assert "Stage: after the end of her pregnancy (6 weeks ago)" in shown
    assert "[ ] depression screening (70%)" in shown and "Left out of the prompt, impossible at this stage" in shown


def test_the_same_filter_serves_the_evaluation_context(monkeypatch):
    """Evaluation and phase C build her context through PromptAssembler.context: the same items are left out."""
    monkeypatch.setattr(self_informed, "predict", ranked(OBGYN, REPORTED_RANKING))
    ctx, _ = assembler_for(OBGYN, {"prenatal visit": 0.8}).context(six_weeks_after_delivery(), None,
                                                                    with_oracle=True)
    assert all(name not in ("augmentation of labor", "miscarriage in the second trimester", "prenatal visit")
               for name, _ in ctx.predictions)
    assert not any("prenatal visit" in f for f in ctx.peer_facts)
    assert {text for text, _, _ in ctx.left_out} >= {"augmentation of labor (90%)",
                                                      "about 80% had prenatal visit within 12 weeks"}


def test_a_profile_without_stages_keeps_every_prediction(monkeypatch):
    chronic = load_profile("chronic")
    first = [c.name for c in chronic.concepts[:5]]
    monkeypatch.setattr(self_informed, "predict", ranked(chronic, first))
    checkup = Example("p", T, sorted(chronic.prediction_points)[0], [], [], [], "test", weeks_postpartum=6.0)
    assert chronic.stage_labels == {} and her_stage(chronic, checkup) is None
    assembled = assembler_for(chronic).assemble(checkup, None)
    assert [n for n, _ in assembled.prompt.predictions] == first and assembled.stage is None
    assert not assembled.left_out and not any(m.startswith("left out") for m in assembled.missing)


def test_trimester_events_end_with_their_trimester():
    assert OBGYN.impossible_at("prenatal", 10.0).get(ID["miscarriage in the first trimester"]) is None
    assert "first trimester ends" in OBGYN.impossible_at("prenatal", 14.0)[ID["miscarriage in the first trimester"]]
    assert ID["miscarriage in the second trimester"] not in OBGYN.impossible_at("prenatal", 20.0)
    assert ID["miscarriage in the second trimester"] in OBGYN.impossible_at("prenatal", 30.0)
    assert ID["augmentation of labor"] not in OBGYN.impossible_at("prenatal", 39.0)  # labour can come
    admitted = example("obstetric admission", [visit("obstetric admission", 0)], gestational_week=39.0)
    stage = her_stage(OBGYN, admitted)
    assert stage.name == "intrapartum" and ID["augmentation of labor"] not in stage.impossible
    assert ID["prenatal visit"] in stage.impossible


def test_a_delivery_or_loss_in_her_record_ends_the_pregnancy_the_record_keeps_open(monkeypatch):
    """The demo report's example: at her initial prenatal visit, a miscarriage today; the record still counts
    her pregnant at week 10, and her prompt said so and predicted a fetal anatomy study."""
    monkeypatch.setattr(self_informed, "predict", ranked(OBGYN, ["fetal anatomy study", "prenatal visit",
                                                                 "fundal height measurement", "hemogram"]))
    lost = example("initial prenatal visit", [visit("initial prenatal visit", 0),
                                              event("miscarriage in the first trimester", 0, "condition")],
                   gestational_week=10.0)
    stage = her_stage(OBGYN, lost)
    assert stage.name == "loss" and stage.label == "after a pregnancy loss (today)"
    assembled = assembler_for(OBGYN).assemble(lost, None)
    text = "\n".join(m["content"] for m in assembled.prompt.messages)
    assert "Pregnant" not in text and "Her pregnancy ended within the past week" in text
    names = [n for n, _ in assembled.prompt.predictions]
    assert "fetal anatomy study" not in names and "fundal height measurement" not in names
    assert "prenatal visit" in names  # the record's follow-up after a loss is coded as a prenatal visit
    # Delivered at the admission: postpartum from then, counted from the delivery, not the record's later end.
    delivered = example("postnatal visit", [event("childbirth", 49), visit("postnatal visit", 0)],
                        weeks_postpartum=6.0)
    assert her_stage(OBGYN, delivered).label == "after the end of her pregnancy (7 weeks ago)"


def test_no_care_event_of_the_sample_follows_a_point_where_it_is_called_impossible():
    """The profile's stage rules against what really happened next, on the sample's two small clinics."""
    points = 0
    for clinic in ("small_clinic_d", "small_clinic_e"):
        for timeline in RecordReader(SAMPLE / clinic):
            for ex in build_examples(timeline, OBGYN):
                stage = her_stage(OBGYN, ex)
                points += 1
                assert not (stage and set(ex.targets) & set(stage.impossible)), (timeline.patient_id, stage)
    assert points > 100


# -- 2. facts computed from her record are true ----------------------------------------------------------------


def test_reported_case_at_a_prenatal_visit_she_is_not_told_she_has_had_no_visit():
    at_visit = example("prenatal visit", [visit("initial prenatal visit", 140), visit("prenatal visit", 35),
                                          visit("prenatal visit", 0)], gestational_week=34.0)
    change = missed_visit(at_visit, OBGYN)
    assert change is not None and "no prenatal visit" not in change.text
    assert change.text.startswith("5 weeks between her previous prenatal visit and today's")
    assert "about every 2 weeks" in change.text and change.values["visit_today"]


def test_no_missed_visit_at_the_first_visit_of_a_new_pregnancy():
    """Visits of an earlier pregnancy are no prenatal care for this one (the record gave '170 weeks')."""
    first = example("initial prenatal visit", [visit("prenatal visit", 400), visit("prenatal visit", 380),
                                               visit("initial prenatal visit", 0)], gestational_week=10.0)
    assert missed_visit(first, OBGYN) is None


def test_no_prenatal_visit_is_said_only_when_none_is_today():
    admitted = example("obstetric admission", [visit("prenatal visit", 21), visit("obstetric admission", 0)],
                       gestational_week=40.0)
    assert missed_visit(admitted, OBGYN).text.startswith("no prenatal visit in the last 3 weeks")
    on_schedule = example("prenatal visit", [visit("prenatal visit", 28), visit("prenatal visit", 0)],
                          gestational_week=20.0)
    assert missed_visit(on_schedule, OBGYN) is None


# -- 3. every answer checked against its prompt ----------------------------------------------------------------

MATCHER = ConceptMatcher(OBGYN)


def prenatal_prompt(**params):
    ctx = PatientContext(
        age_years=30, gestational_week=30, visit="prenatal visit", wording=OBGYN.wording,
        history=["fetal anatomy study (35 days ago)", "glucose screening (today)"],
        observations=["blood pressure 128/84 mmHg"],
        predictions=[("prenatal visit", 0.75), ("group B strep test", 0.4), ("Tdap vaccination", 0.3),
                     ("depression screening", 0.2), ("hemogram", 0.1)],
        peer_facts=["Among about 300 similar patients across the consortium:",
                    "about 60% had fetal heart auscultation within 12 weeks"], horizon_weeks=12)
    return render(ctx, PromptParams(show_probs=True, **params))


EIGHT_BULLETS = """Here is her checklist:
- Prenatal visit (20%)
- Group B strep test (40%)
- Fetal anatomy study 3 weeks ago
- Pap smear within 2 weeks
- Tdap vaccination at gestational week 32
- Depression screening
- Hemogram
- Fetal heart auscultation
"""


def test_reported_answer_faults_are_flagged_and_excess_items_removed():
    prompt = prenatal_prompt()
    assert prompt.max_items == 5 and "At most 5 bullets" in prompt.messages[-1]["content"]
    check = check_answer(EIGHT_BULLETS, prompt, MATCHER)
    reasons = {i.text: i.reasons for i in check.items}
    assert reasons["- Prenatal visit (20%)"] == ["says 20% where the prompt says 75% (prenatal visit)"]
    assert reasons["- Group B strep test (40%)"] == []
    assert reasons["- Fetal anatomy study 3 weeks ago"] == [
        "says 3 weeks ago where the prompt gives another time for it"]
    assert reasons["- Pap smear within 2 weeks"] == ["names Pap smear, which is neither in the prompt nor in the record"]
    assert reasons["- Tdap vaccination at gestational week 32"] == [
        "says gestational week 32 where the prompt says 30"]
    # Eight bullets where five are allowed: the last three go, the introduction stays.
    assert [i.text for i in check.removed] == ["- Depression screening", "- Hemogram", "- Fetal heart auscultation"]
    assert all("beyond the 5 items the prompt allows" in i.reasons[-1] for i in check.removed)
    assert check.text.count("\n- ") == 5 and "Hemogram" not in check.text and check.text.startswith("Here is")
    assert len(check.kept) == 6 and len(check.flagged) == 7


def test_grounded_answers_pass_and_her_record_counts_as_grounded():
    prompt = prenatal_prompt()
    good = ("1. Prenatal visit (75%)\n2. Fetal anatomy study 5 weeks ago: review\n3. Group B strep test in 4 weeks\n"
            "4. About 60% of similar patients had fetal heart auscultation\n")
    check = check_answer(good, prompt, MATCHER)
    assert not check.flagged and not check.removed and check.text == good
    pap = check_answer("- Pap smear\n", prompt, MATCHER, record={ID["Pap smear"]})
    assert not pap.flagged  # named in her record: not invented


def test_numbers_beyond_the_prompt_are_flagged():
    prompt = prenatal_prompt()
    check = check_answer("- Glucose screening within the next 6 months\n- Blood pressure 150/95 mmHg: recheck\n"
                         "- 78% of patients are healthy\n- Nothing recorded in 6 months prior to today\n", prompt,
                         MATCHER)
    assert [r for i in check.items for r in i.reasons] == [
        "looks 6 months ahead, beyond the prompt's 12-week horizon",
        "says blood pressure 150/95, a reading the prompt does not give",
        "says 78%, a figure the prompt does not give"]


def test_an_answer_naming_what_cannot_follow_her_stage_is_flagged():
    ctx = PatientContext(age_years=30, weeks_postpartum=6, visit="postnatal visit", wording=OBGYN.wording,
                         history=["childbirth (6 weeks ago)"], predictions=[("depression screening", 0.7)])
    impossible = OBGYN.impossible_at("postpartum")
    check = check_answer("- Depression screening\n- Induction of labor this week\n- Childbirth 6 weeks ago: recovered\n",
                         render(ctx), MATCHER, impossible=impossible)
    reasons = {i.text: i.reasons for i in check.items}
    assert reasons["- Depression screening"] == []
    assert reasons["- Induction of labor this week"] == [
        "names induction of labor, which cannot happen at this stage: labour and delivery events cannot follow the "
        "end of her pregnancy"]
    assert reasons["- Childbirth 6 weeks ago: recovered"] == []  # her history, restated with the prompt's time


def test_a_format_that_names_no_count_removes_nothing():
    prompt = prenatal_prompt(format=2)
    assert prompt.max_items is None
    check = check_answer(EIGHT_BULLETS, prompt, MATCHER)
    assert not check.removed and check.text == EIGHT_BULLETS


def test_headings_and_empty_bullets_are_not_items():
    prompt = prenatal_prompt()
    answer = "1. Now:\n- Prenatal visit\n- Tdap vaccination\n2. Later:\n- Hemogram\n-\n- Group B strep test\n" \
             "- Depression screening\n3. Also:\n- Pap smear\n"
    check = check_answer(answer, prompt, MATCHER)
    assert [i.text for i in check.kept if i.counted] == ["- Prenatal visit", "- Tdap vaccination", "- Hemogram",
                                                          "- Group B strep test", "- Depression screening"]
    assert [i.text for i in check.removed] == ["3. Also:", "- Pap smear"]


# -- 4. the notice, and pmlm advise's order: checklist, checked prose, notice -----------------------------------


def test_the_notice_names_the_model_and_where_it_runs():
    assert advice_notice(model_label(LLMConfig())) == (
        "Generated by smollm2 (local, embedded SmolLM2-135M-Instruct) — decision support, not a diagnosis; "
        "check against the record.")
    assert model_label(LLMConfig(base_url="https://api.openai.com/v1", model="gpt-4o")) == \
        "gpt-4o (remote endpoint api.openai.com)"
    assert model_label(LLMConfig(base_url="http://127.0.0.1:8080/v1", model="llama3")) == \
        "llama3 (local endpoint 127.0.0.1)"


SEVEN_BULLETS = "\n".join(f"- Prenatal visit {i}" for i in range(1, 8)) + "\n"


@pytest.fixture()
def advise_site(tmp_path):
    rows = ["patient_id,time,kind,system,code,display,value,unit,end,encounter_class",
            "p1,1995-02-03,patient,,female,,,,,",
            "p1,2024-01-02T10:00:00Z,condition,http://snomed.info/sct,72892002,Normal pregnancy,,,,",
            "p1,2024-02-02T10:00:00Z,encounter,http://snomed.info/sct,424441002,Prenatal initial visit,,,,AMB",
            "p1,2024-03-01T10:00:00Z,encounter,http://snomed.info/sct,424619006,Prenatal visit,,,,AMB"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "events.csv").write_text("\n".join(rows) + "\n")
    with serving(FakeOpenAIServer(text=SEVEN_BULLETS)) as llm:
        SiteConfig("site-a", str(tmp_path / "data"), "obgyn",
                   {"base_url": llm.base_url, "model": "fake-model", "max_retries": 0}).save(tmp_path / "site")
        yield tmp_path / "site"


def test_advise_prints_the_checklist_then_the_checked_answer_then_the_notice(advise_site, capsys):
    assert main(["advise", "--site", str(advise_site), "--patient", "p1"]) == 0
    out = capsys.readouterr().out
    checklist, guidance, notice = (out.index("Care checklist: what PMLM predicts for this patient"), out.index("Guidance:"),
                                   out.index("Generated by fake-model (local endpoint 127.0.0.1)"))
    assert checklist < guidance < notice
    assert "Stage: pregnant, gestational week" in out
    assert out.rstrip().endswith("decision support, not a diagnosis; check against the record.")
    answer = out[guidance:notice]
    assert "- Prenatal visit 5" in answer and "Removed, beyond the 5 items the prompt allows:" in answer
    assert answer.index("- Prenatal visit 5") < answer.index("Removed") < answer.index("x - Prenatal visit 6")
