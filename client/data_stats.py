"""How well a data set suits a task profile, and the floors every later model must beat.

Pooled over the consortium and per site: a small clinic's floors, trained on its own few patients, are what it
reaches alone; `floors_consortium_train` scores its test points with floors trained on every site's training split
(pooled, no privacy), a reference for what more data could give it.
"""

from __future__ import annotations

import math

from pmlm.client.baselines import Popularity, TimingFloor, evaluate_ranker
from pmlm.client.examples import Example, horizon_events
from pmlm.client.sites import SiteData
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Timeline


def _floors(train: list[Example], test: list[Example]) -> dict[str, dict]:
    return {"popularity": evaluate_ranker(Popularity(train), test),
            "timing": evaluate_ranker(TimingFloor(train), test)}


def _no_nan(floors: dict[str, dict]) -> dict[str, dict]:
    """A site without test points has no floor: null in JSON, not NaN (which strict JSON readers refuse)."""
    return {name: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in m.items()}
            for name, m in floors.items()}


def site_stats(site: SiteData, consortium: dict[str, object], episodes: bool = False) -> dict:
    """One site's figures; `episodes`: the profile has pregnancies to count (obgyn)."""
    train = [ex for ex in site.examples if ex.split == "train"]
    test = [ex for ex in site.examples if ex.split == "test" and ex.targets]
    return {
        "patients": site.patients,
        "patients_with_points": len({ex.patient_id for ex in site.examples}),
        **({"pregnancies": site.pregnancies} if episodes else {}),
        "prediction_points": len(site.examples),
        "train_points": len(train),
        "test_points": len(test),
        "test_patients": len({ex.patient_id for ex in test}),
        "floors": _no_nan(_floors(train, test)),
        "floors_consortium_train": _no_nan({name: evaluate_ranker(ranker, test) for name, ranker in consortium.items()}),
    }


def data_stats(loaded: list[tuple[SiteData, list[Timeline]]], profile: TaskProfile) -> dict:
    examples = [ex for site, _ in loaded for ex in site.examples]
    total = covered = 0
    for _, timelines in loaded:
        for timeline in timelines:
            t, c = horizon_events(timeline, profile)
            total += t
            covered += c
    train = [ex for ex in examples if ex.split == "train"]
    test = [ex for ex in examples if ex.split == "test" and ex.targets]
    consortium = {"popularity": Popularity(train), "timing": TimingFloor(train)}
    floors = {name: evaluate_ranker(ranker, test) for name, ranker in consortium.items()}
    return {
        "profile": profile.name,
        "vocabulary": len(profile),
        "patients": sum(site.patients for site, _ in loaded),
        "patients_with_points": sum(len({ex.patient_id for ex in site.examples}) for site, _ in loaded),
        # Pregnancies only where the profile has them (its "pregnancy" section): obgyn.
        **({"pregnancies": sum(site.pregnancies for site, _ in loaded)} if profile.pregnancy_start else {}),
        "prediction_points": len(examples),
        "test_points": len(test),
        "test_patients": len({(ex.site, ex.patient_id) for ex in test}),
        "coverage": covered / total if total else float("nan"),
        "targets_per_point": sum(len(ex.targets) for ex in examples) / max(len(examples), 1),
        "distinct_targets": len({c for ex in examples for c in ex.targets}),
        "floors": floors,
        "sites": {site.name: site_stats(site, consortium, bool(profile.pregnancy_start)) for site, _ in loaded},
    }
