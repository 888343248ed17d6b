"""Prediction examples, splits and the task profiles (including switching profile without code)."""

from datetime import timedelta

import pytest

from chronic_records import chronic_timeline
from pmlm.client.examples import build_examples, patient_split, pregnancies
from pmlm.client.ingest import RecordReader
from pmlm.common.profiles import available_profiles, load_profile


@pytest.fixture(scope="module")
def timelines(synthea_bundles):
    return list(RecordReader(synthea_bundles))


def test_profiles_are_data_and_broad():
    assert {"obgyn", "chronic"} <= set(available_profiles())
    ob = load_profile("obgyn")
    kinds = {c.kind for c in ob.concepts}
    assert kinds >= {"encounter", "condition", "procedure", "report", "immunization", "medication"}
    assert len(ob) >= 200  # every kind of care event, not a pregnancy-keyword list
    assert 20 <= sum(c.obgyn for c in ob.concepts) < len(ob) / 2
    for cid in ob.prediction_points | ob.risks:
        assert cid in ob.index
    # readable names and synonyms for what clinicians say
    anatomy = ob.concepts[ob.index["snomed:271442007"]]
    assert anatomy.name == "fetal anatomy study" and "anatomy scan" in anatomy.synonyms
    with pytest.raises(ValueError, match="unknown task profile"):
        load_profile("cardiology-that-does-not-exist")


def test_examples_respect_the_horizon_and_relative_times(timelines):
    profile = load_profile("obgyn")
    horizon = timedelta(days=profile.horizon_days)
    total = 0
    for timeline in timelines:
        for ex in build_examples(timeline, profile):
            total += 1
            assert ex.point in profile.prediction_points
            assert all(h.days_before >= 0 for h in ex.history)
            expected = {e.concept for e in timeline.events
                        if ex.t < e.time <= ex.t + horizon and profile.is_target(e.concept, e.kind)}
            assert set(ex.targets) == expected
            assert set(ex.risks) <= set(ex.targets) and set(ex.risks) <= profile.risks
            assert len(ex.history) == sum(1 for e in timeline.events if e.time <= ex.t)
            if ex.gestational_week is not None:
                assert 2 <= ex.gestational_week < 60
    assert total > 0


def test_pregnancy_episodes_and_first_visit(timelines):
    profile = load_profile("obgyn")
    found = 0
    for timeline in timelines:
        for p in pregnancies(timeline, profile):
            found += 1
            if p.first_visit:
                assert p.start <= p.first_visit
    assert found >= 1


def test_splits_are_stable_and_patient_level(timelines):
    profile = load_profile("obgyn")
    for timeline in timelines:
        splits = {ex.split for ex in build_examples(timeline, profile)}
        assert len(splits) <= 1
        assert splits <= {patient_split(timeline.patient_id)}
    assert patient_split("abc") == patient_split("abc")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(3000):
        counts[patient_split(f"patient-{i}")] += 1
    assert 0.65 < counts["train"] / 3000 < 0.75 and 0.12 < counts["test"] / 3000 < 0.18


def test_switching_profile_needs_no_code_change(timelines):
    chronic = load_profile("chronic")
    obgyn = load_profile("obgyn")
    # The sample's women are 15-40: under the chronic scope (adults 40 and over); an in-memory chronic record too.
    ex_chronic = [ex for t in [*timelines, chronic_timeline()] for ex in build_examples(t, chronic)]
    ex_obgyn = [ex for t in timelines for ex in build_examples(t, obgyn)]
    assert ex_chronic and ex_obgyn
    assert {ex.point for ex in ex_chronic} <= chronic.prediction_points
    assert not ({ex.point for ex in ex_chronic} & obgyn.prediction_points)
    assert all(ex.gestational_week is None for ex in ex_chronic)
    assert all(set(ex.targets) <= set(chronic.index) for ex in ex_chronic)
