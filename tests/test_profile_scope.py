"""#20: the profile says who and when is in scope, and every disease-specific word comes from it.

- obgyn's scope keeps every example of the sample (counted per site on one small clinic), and its prompt is
  unchanged (a rendered prompt of a fixed context, snapshotted before the wording moved into the profile);
- chronic's scope drops infancy check-ups, points before the last 10 years of the record and inpatient points;
- a chronic prompt carries no obstetric wording, and "her"/"she" only for a woman (pronouns from her record).
"""

import re
from pathlib import Path

import pytest

from chronic_records import LAST_YEAR, chronic_timeline
from pmlm.client.assemble.context import build_context
from pmlm.client.baselines import TimingFloor, timing_key
from pmlm.client.examples import build_examples
from pmlm.client.ingest import RecordReader
from pmlm.common.assemble.render import VARIANTS, PatientContext, PromptParams, render, render_variant
from pmlm.common.profiles import load_profile

OBGYN, CHRONIC = load_profile("obgyn"), load_profile("chronic")
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "small_clinic_d"
# "Not in labor force" is a social finding of the chronic vocabulary, not childbirth: the DP recommender's noisy
# ranking may name it in a chronic prompt (CI once failed on exactly that).
OBSTETRIC = re.compile(r"pregnan|gestation|prenatal|postnatal|postpartum|obstetric|gynecolog|delivery"
                       r"|labou?r\b(?!\s+force)", re.IGNORECASE)


def test_the_obstetric_pattern_tells_childbirth_from_the_labor_force():
    assert all(OBSTETRIC.search(t) for t in ("Induction of labor", "in labour", "Prenatal visit", "postpartum"))
    assert not OBSTETRIC.search("Not in labor force (finding) (12%)")


def _text(prompt) -> str:
    return "\n".join(m["content"] for m in prompt.messages)


@pytest.mark.skipif(not SAMPLE.exists(), reason="the bundled sample consortium is not in this checkout")
def test_obgyn_scope_keeps_every_example_of_the_sample():
    counts = {"train": 0, "val": 0, "test": 0}
    for timeline in RecordReader(SAMPLE):
        for ex in build_examples(timeline, OBGYN):
            counts[ex.split] += 1
    assert counts == {"train": 213, "val": 59, "test": 32}  # as before the profile had a scope (commit 1e732d1)


def test_chronic_scope_drops_points_outside_it():
    timeline = chronic_timeline()
    examples = build_examples(timeline, CHRONIC)
    assert examples, "the chronic record has in-scope points"
    assert all(ex.age_years >= 40 for ex in examples)  # no infancy check-ups
    assert min(ex.t.year for ex in examples) >= LAST_YEAR - 10  # only the last 10 years of the record
    inpatient = [e for e in timeline.events if e.kind == "encounter" and e.encounter_class == "IMP"]
    assert inpatient and not {ex.t for ex in examples} & {e.time for e in inpatient}
    years = sorted(ex.t.year for ex in examples if ex.point == "snomed:162673000")
    assert years == list(range(LAST_YEAR - 9, LAST_YEAR + 1))
    # Everything from birth is a point without a scope: the profile's scope is what drops the rest.
    unscoped = [e for e in timeline.events if e.kind == "encounter" and e.concept in CHRONIC.prediction_points]
    assert len(unscoped) > 5 * len(examples)


def test_chronic_timing_floor_runs_on_age_not_pregnancy():
    examples = build_examples(chronic_timeline(), CHRONIC)
    assert {ex.clock for ex in examples} == {int(ex.age_years // 5) for ex in examples}
    assert all(ex.gestational_week is None and ex.weeks_since_first_visit is None for ex in examples)
    floor = TimingFloor(examples)
    assert {timing_key(ex) for ex in examples} == set(floor.by_key)
    assert CHRONIC.wording.clock_label == "encounter type and 5-year age band"


@pytest.mark.parametrize("gender,allowed,banned", [("male", {"he", "his", "him"}, {"she", "her"}),
                                                   ("female", {"she", "her"}, {"he", "his", "him"}),
                                                   ("", set(), {"she", "her", "he", "his", "him"})])
def test_chronic_prompt_has_no_obstetric_wording_and_her_pronouns_follow_her_record(gender, allowed, banned):
    timeline = chronic_timeline(gender=gender)
    example = build_examples(timeline, CHRONIC)[-1]
    ctx = build_context(example, CHRONIC, timeline, predictions=[("lipid panel", 0.8), ("Essential hypertension", 0.3)],
                        trajectory=["blood pressure 135/80 mmHg at the latest reading"],
                        peer_facts=["Among about 60 similar patients:", "about 40% had a lipid panel"], with_oracle=True)
    texts = [_text(render_variant(name, ctx)) for name in VARIANTS]
    texts += [_text(render(ctx, PromptParams(phrasing=i, format=j, notes=True))) for i in range(4) for j in range(5)]
    for text in texts:
        assert not OBSTETRIC.search(text), OBSTETRIC.search(text)
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & banned, words & banned
    every = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
    assert allowed <= every
    if not gender:
        assert "the patient's own record" in " ".join(texts)
    assert "primary care" in texts[0]  # the profile's role


# The obgyn prompt of a fixed context, rendered before the wording moved into the profile (commit 1e732d1).
SNAPSHOT = [
    {"role": "system", "content": "You are a clinical decision-support assistant for obstetrics and gynecology. You "
     "help a clinician plan the care of one patient. Be specific and concise."},
    {"role": "user", "content": "What care does this patient need over the next 12 weeks?\n\nPatient summary:\n"
     "- Age: 29\n- Pregnant, gestational week 24\n- Today's visit: prenatal visit\n"
     "- Recent: fetal anatomy study (5 weeks ago)\n- Recent: glucose screening (today)\n"
     "- Observed: blood pressure 128/84 mmHg\n- Observed: weight 71 kg\n\n"
     "Care events predicted for her in the next 12 weeks (from her own record):\n- prenatal visit\n"
     "- glucose screening\n- Tdap vaccination\nChanges in her trajectory:\n"
     "- weight gained 3.0 kg over 8 weeks (now 71.0 kg)\n\nAmong about 40 similar patients:\n"
     "- 60% had a prenatal visit\n- 30% had Tdap vaccination\n\n"
     "Base your answer on her own predicted care events first, then on what happened to similar patients; mention "
     "a risk only if the data above supports it.\n\nRewrite the expected care listed above as a checklist for her "
     "clinician: one bullet per item, keeping each item's name, most urgent first. At most 5 bullets."},
]


def test_obgyn_prompt_is_unchanged():
    ctx = PatientContext(age_years=29, gestational_week=24, visit="prenatal visit",
                         history=["fetal anatomy study (5 weeks ago)", "glucose screening (today)"],
                         observations=["blood pressure 128/84 mmHg", "weight 71 kg"],
                         notes=["Patient reports mild headaches."],
                         predictions=[("prenatal visit", 0.91), ("glucose screening", 0.55), ("Tdap vaccination", 0.4)],
                         trajectory=["weight gained 3.0 kg over 8 weeks (now 71.0 kg)"],
                         peer_facts=["Among about 40 similar patients:", "60% had a prenatal visit",
                                     "30% had Tdap vaccination"],
                         horizon_weeks=12, wording=OBGYN.wording, gender="")  # obgyn: "her" whatever the record says
    assert render_variant("self_peer", ctx).messages == SNAPSHOT
    after = render(PatientContext(weeks_postpartum=6, wording=OBGYN.wording), PromptParams()).messages[1]["content"]
    assert "- 6 weeks after the end of her pregnancy" in after


def test_the_scope_reads_in_words():
    assert CHRONIC.scope.describe() == "aged 40 or more, in the last 10 years of the record, AMB encounters"
    assert OBGYN.scope.describe() == ""
