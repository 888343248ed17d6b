"""Ranking metrics for next-event recommendation, shared by every phase and benchmark.

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
