"""The reward on hand-written answers: exact values, deterministic."""

import math

import pytest

from pmlm.client.examples import Example, HistoryItem
from pmlm.client.reward import ConceptMatcher, RewardWeights, score_answer
from pmlm.common.profiles import load_profile

ANATOMY, GBS, PRENATAL, PREECLAMPSIA, GLUCOSE = ("snomed:271442007", "snomed:118001005", "snomed:424619006",
                                                  "snomed:398254007", "snomed:268556000")


@pytest.fixture(scope="module")
def matcher():
    return ConceptMatcher(load_profile("obgyn"))


def _example(targets, risks=(), history=()):
    return Example("p", None, PRENATAL, list(history), sorted(targets), sorted(risks), "test")


def test_perfect_answer_by_synonyms(matcher):
    ex = _example({ANATOMY, GBS, PRENATAL})
    s = score_answer("- Book the anatomy scan.\n- Do a GBS test at 36 weeks.\n- Next prenatal appointment in 4 weeks.",
                     ex, matcher)
    assert set(s.mentioned) == {ANATOMY, GBS, PRENATAL}
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)
    assert math.isnan(s.risk_recall) and s.reward == 1.0


def test_partial_answer_exact_values(matcher):
    ex = _example({ANATOMY, GBS, PRENATAL, GLUCOSE})
    s = score_answer("Schedule the fetal anatomy study and a glucose screening; also check her Pap smear.", ex, matcher)
    assert set(s.mentioned) == {ANATOMY, GLUCOSE, "snomed:90226004"}
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(0.5)
    assert s.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_generic_answer_scores_zero(matcher):
    s = score_answer("Eat well, rest, and stay hydrated during pregnancy.", _example({ANATOMY}), matcher)
    assert s.mentioned == () and s.f1 == 0.0 and s.reward == 0.0


def test_risk_recall_and_weight(matcher):
    ex = _example({PRENATAL, PREECLAMPSIA}, risks={PREECLAMPSIA})
    s = score_answer("Watch for preeclampsia; next prenatal visit soon.", ex, matcher)
    assert s.risk_recall == 1.0 and s.reward == pytest.approx(1.0 + 0.5)
    miss = score_answer("Next prenatal visit soon.", ex, matcher)
    assert miss.risk_recall == 0.0 and miss.reward == pytest.approx(miss.f1)


def test_penalties_for_length_and_repeating_what_she_had(matcher):
    ex = _example({PRENATAL}, history=[HistoryItem(ANATOMY, "procedure", 10.0)])
    s = score_answer("Prenatal visit. Repeat the fetal anatomy study.", ex, matcher)
    assert s.already_had == (ANATOMY,)
    assert s.reward == pytest.approx(s.f1 - 0.2 * 0.5)
    long = score_answer("prenatal visit " + "word " * 248, ex, matcher, RewardWeights())
    assert long.words == 250 and long.reward == pytest.approx(long.f1 - 0.1 * 1.0)


def test_deterministic(matcher):
    ex = _example({ANATOMY, GBS})
    a = score_answer("anatomy ultrasound and group b strep screening", ex, matcher)
    assert a == score_answer("anatomy ultrasound and group b strep screening", ex, matcher)
