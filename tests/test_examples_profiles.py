"""Prediction examples, splits and the task profiles (including switching profile without code)."""

import multiprocessing
import pickle
from datetime import timedelta
from pathlib import Path

import pytest

from chronic_records import chronic_timeline
from pmlm.client import examples as examples_module
from pmlm.client.examples import HistoryItem, build_examples, patient_split, pregnancies
from pmlm.client.features import FeatureEncoder
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


def _history_as_read_directly(timeline, t) -> list[HistoryItem]:
    return [HistoryItem(e.concept, e.kind, (t - e.time).total_seconds() / 86400,
                        None if e.kind == "note" else e.value, e.unit) for e in timeline.events if e.time <= t]


def test_examples_of_a_patient_share_her_events_and_read_as_her_history(timelines):
    """A patient's events are held once for all her prediction points (not a copy per point), and each example's
    history reads exactly as the events up to its time, note text left out."""
    profile = load_profile("obgyn")
    checked = 0
    for timeline in timelines:
        examples = build_examples(timeline, profile)
        if len(examples) < 2:
            continue
        assert len({id(ex.history.events) for ex in examples}) == 1
        for ex in examples:
            expected = _history_as_read_directly(timeline, ex.t)
            assert list(ex.history) == expected
            assert list(reversed(ex.history)) == expected[::-1] and ex.history[-1] == expected[-1]
            assert ex.history[2:5] == expected[2:5]
            checked += 1
    assert checked > 10


def _examples_pickled_in_a_fresh_process(folder: str) -> bytes:
    from pmlm.client import examples as fresh  # a new interpreter: its table of codes starts empty
    fresh._triple("local:not-in-the-records", "procedure", "")  # and numbers them differently from the parent's
    return pickle.dumps([ex for t in RecordReader(Path(folder)) for ex in fresh.build_examples(t, load_profile("obgyn"))])


def test_examples_copied_from_another_process_keep_their_histories_and_features(synthea_bundles):
    """Sites may read in worker processes: event codes number a per-process table, so a copy must carry what they
    stand for. The parent's table is filled in another order first; histories and encoded features still match."""
    examples_module._triple("local:only-in-the-parent", "observation", "mg")
    profile = load_profile("obgyn")
    here = [ex for t in RecordReader(synthea_bundles) for ex in build_examples(t, profile)]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        copied = pickle.loads(pool.apply(_examples_pickled_in_a_fresh_process, (str(synthea_bundles),)))
    assert len(copied) == len(here) > 0
    assert all(list(a.history) == list(b.history) for a, b in zip(here, copied))
    encoder = FeatureEncoder(profile)
    assert all(bool((x == y).all()) for x, y in zip(encoder.encode(here), encoder.encode(copied)))


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
