"""The floors every model must beat: global popularity and timing on the profile's clock.

Both are fitted on training examples only and rank the profile's concepts for an example.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from pmlm.client.examples import Example
from pmlm.common.metrics import mean_ignoring_nan, ndcg_at_k, recall_at_k


class Popularity:
    """Most frequent targets in the training examples, the same list for everyone."""

    def __init__(self, examples: Iterable[Example]):
        counts = Counter(c for ex in examples for c in ex.targets)
        self.ranking = [c for c, _ in counts.most_common()]
        self.counts = counts

    def rank(self, example: Example, k: int) -> list[str]:
        return self.ranking[:k]


def timing_key(example: Example) -> tuple[str, int | None]:
    """The encounter type and the reading of the profile's clock at the point (Example.clock: e.g. 4-week steps
    since the first visit of an episode, or a 5-year age band; None where the clock does not run)."""
    return example.point, example.clock


class TimingFloor:
    """Most frequent targets given the encounter type and the profile's clock (its wording names it)."""

    def __init__(self, examples: Iterable[Example]):
        examples = list(examples)
        self.by_key: dict[tuple, Counter] = defaultdict(Counter)
        for ex in examples:
            self.by_key[timing_key(ex)].update(ex.targets)
        self.fallback = Popularity(examples)

    def rank(self, example: Example, k: int) -> list[str]:
        counts = self.by_key.get(timing_key(example))
        ranked = [c for c, _ in counts.most_common(k)] if counts else []
        for c in self.fallback.ranking:  # fill from global popularity when the bucket is thin
            if len(ranked) >= k:
                break
            if c not in ranked:
                ranked.append(c)
        return ranked


GestationalTiming = TimingFloor  # the name bench/recsys.py and bench/peers.py still import


def evaluate_ranker(ranker, examples: Iterable[Example], k: int = 5) -> dict[str, float]:
    examples = [ex for ex in examples if ex.targets]
    return {
        f"recall@{k}": mean_ignoring_nan(recall_at_k(ranker.rank(ex, k), ex.targets, k) for ex in examples),
        f"ndcg@{k}": mean_ignoring_nan(ndcg_at_k(ranker.rank(ex, k), ex.targets, k) for ex in examples),
        "points": len(examples),
    }
