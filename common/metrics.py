"""Ranking metrics for next-event recommendation, shared by every phase and benchmark, and the bootstrap intervals
over patients every reported figure carries.

Recall@k is normalised by min(k, |targets|) so a perfect ranking scores 1 whatever the number of
targets (the convention of multi-label recommenders); NDCG@k uses binary relevance.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[str], targets: Iterable[str], k: int) -> float:
    targets = set(targets)
    if not targets:
        return float("nan")
    hits = sum(1 for c in ranked[:k] if c in targets)
    return hits / min(k, len(targets))


def ndcg_at_k(ranked: Sequence[str], targets: Iterable[str], k: int) -> float:
    targets = set(targets)
    if not targets:
        return float("nan")
    dcg = sum(1 / math.log2(i + 2) for i, c in enumerate(ranked[:k]) if c in targets)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(targets))))
    return dcg / ideal


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks); nan if one class only."""
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=float)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_ignoring_nan(values: Iterable[float]) -> float:
    arr = np.array([v for v in values], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def patient_bootstrap(values: np.ndarray, patients: Sequence, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates (resamples, m) of the mean over points of each column of `values` (points, m),
    resampling patients: all of a patient's points go in or out together, so a patient with many prediction
    points counts as one independent draw, and each replicate is point-weighted as the figure itself is.
    Columns scored on the same points (two models) share every draw, which pairs their differences and ratios.
    A fixed seed: the same scores give the same replicates."""
    values = np.asarray(values, dtype=float)
    values = values[:, None] if values.ndim == 1 else values
    if len(values) == 0:
        return np.full((resamples, values.shape[1]), np.nan)
    _, patient = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    n = int(patient.max()) + 1
    sums = np.zeros((n, values.shape[1]))
    np.add.at(sums, patient, values)
    points = np.bincount(patient, minlength=n).astype(float)
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    return (draws @ sums) / (draws @ points)[:, None]


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval of bootstrap replicates (nan where there were no points)."""
    replicates = np.asarray(replicates, dtype=float)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(replicates, (1 - level) / 2)), float(np.quantile(replicates, (1 + level) / 2))]


def paired_interval(a: list[float], b: list[float], patients: list | None = None, resamples: int = 2000,
                    level: float = 0.95) -> dict:
    """Mean of a − b and mean(a)/mean(b) over the same points, each with a percentile bootstrap interval that
    draws the points together and resamples patients (`patients`: each point's patient; None: one point a
    patient); a resample whose b-mean is 0 is left out of the ratio's interval. Fixed seed: the same scores give
    the same intervals."""
    patients = range(len(a)) if patients is None else patients
    kept = [(x, y, p) for x, y, p in zip(a, b, patients) if not (np.isnan(x) or np.isnan(y))]
    pairs = np.asarray([(x, y) for x, y, _ in kept], dtype=float).reshape(-1, 2)
    replicates = patient_bootstrap(pairs, [p for _, _, p in kept], resamples=resamples)
    mean_a, mean_b = pairs.mean(axis=0) if len(pairs) else (float("nan"), float("nan"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"difference": float(mean_a - mean_b),
                "difference_interval": percentile_interval(replicates[:, 0] - replicates[:, 1], level),
                "ratio": float(mean_a / mean_b) if mean_b > 0 else float("nan"),
                "ratio_interval": percentile_interval(replicates[:, 0] / replicates[:, 1], level),
                "points": int(len(pairs)), "patients": len({str(p) for _, _, p in kept})}


def bootstrap_interval(values: list[float], patients: list | None = None, resamples: int = 2000,
                       level: float = 0.95) -> list[float]:
    """A percentile bootstrap interval of the mean over the scored points, resampling patients (`patients`: each
    point's patient; None: one point a patient); fixed seed, so the same scores give the same interval."""
    patients = range(len(values)) if patients is None else patients
    kept = [(v, p) for v, p in zip(values, patients) if not np.isnan(v)]
    replicates = patient_bootstrap(np.asarray([v for v, _ in kept], dtype=float), [p for _, p in kept],
                                   resamples=resamples)
    return percentile_interval(replicates[:, 0], level)


# A percentile bootstrap over fewer patients than this draws from too few distinct resamples and its interval is
# too narrow: in the demo, one hospital's 5 test patients gave +0.264 [+0.086, +0.425] for a refined prompt that
# scored -0.028 on 40 points of 23 patients (bench/refinements.py). Such a difference is not read either way.
MIN_PATIENTS_TO_TELL = 10


def paired_verdict(difference, interval, patients: int | None = None) -> str:
    """How a paired difference reads: "gain" or "loss" only where its interval excludes 0 and rests on at least
    MIN_PATIENTS_TO_TELL patients (None: not known, as in reports written before the count was kept)."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    if not (finite(difference) and isinstance(interval, (list, tuple)) and len(interval) == 2
            and all(finite(v) for v in interval)):
        return "not measured"
    if patients is not None and patients < MIN_PATIENTS_TO_TELL:
        return "too few patients to tell"
    if interval[0] > 0:
        return "gain"
    if interval[1] < 0:
        return "loss"
    return "no difference"
