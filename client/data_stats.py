"""How well a data set suits a task profile, and the floors every later model must beat."""

from __future__ import annotations

from pmlm.client.baselines import GestationalTiming, Popularity, evaluate_ranker
from pmlm.client.examples import horizon_events
from pmlm.client.sites import SiteData
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Timeline


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
    floors = {
        "popularity": evaluate_ranker(Popularity(train), test),
        "gestational_timing": evaluate_ranker(GestationalTiming(train), test),
    }
    return {
        "profile": profile.name,
        "vocabulary": len(profile),
        "patients": sum(site.patients for site, _ in loaded),
        "prediction_points": len(examples),
        "test_points": len(test),
        "coverage": covered / total if total else float("nan"),
        "targets_per_point": sum(len(ex.targets) for ex in examples) / max(len(examples), 1),
        "distinct_targets": len({c for ex in examples for c in ex.targets}),
        "floors": floors,
    }
