"""Guidance quality, computed only at the site: the LLM's answer scored against what really happened next.

Concepts are found in the answer by the profile's names and synonyms (whole words, case-insensitive),
then compared with her targets in (t, t+h]: precision, recall, F1, risk recall. The RL reward adds
penalties for length and for recommending what she already had. Deterministic by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from pmlm.client.examples import Example
from pmlm.common.profiles import TaskProfile, load_profile

@dataclass(frozen=True)
class RewardWeights:
    risk: float = 0.5  # weight of risk recall when she has a risk event ahead
    length: float = 0.1  # per 100 words beyond `free_words`
    free_words: int = 150
    repeat: float = 0.2  # times the share of mentioned concepts she already had and does not need again
    repeat_window_days: int = 84


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    f1: float
    risk_recall: float  # nan when she has no risk event ahead
    mentioned: tuple[str, ...]
    already_had: tuple[str, ...]
    words: int
    reward: float


class ConceptMatcher:
    """Which profile concepts an answer names; one compiled pattern per concept, built once per profile."""

    def __init__(self, profile: TaskProfile):
        self.profile = profile
        self.patterns: list[tuple[str, re.Pattern]] = []
        for c in profile.concepts:
            # A name too generic to count on its own (the profile's generic_terms: e.g. any advice names them).
            terms = {t.lower() for t in (c.name, *c.synonyms)} - profile.generic_terms
            terms = {t for t in terms if len(t) >= 3}
            if terms:
                alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
                self.patterns.append((c.id, re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)))

    def mentioned(self, text: str) -> set[str]:
        return {cid for cid, pattern in self.patterns if pattern.search(text)}


@lru_cache(maxsize=8)
def matcher_for(profile_name: str) -> ConceptMatcher:
    return ConceptMatcher(load_profile(profile_name))


def score_answer(answer: str, example: Example, matcher: ConceptMatcher,
                 weights: RewardWeights = RewardWeights()) -> Score:
    mentioned = matcher.mentioned(answer)
    targets = set(example.targets)
    hits = mentioned & targets
    precision = len(hits) / len(mentioned) if mentioned else 0.0
    recall = len(hits) / len(targets) if targets else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    risks = set(example.risks)
    risk_recall = len(mentioned & risks) / len(risks) if risks else math.nan
    recent = {h.concept for h in example.history if h.days_before <= weights.repeat_window_days}
    already = (mentioned & recent) - targets
    words = len(answer.split())
    reward = f1
    if risks:
        reward += weights.risk * risk_recall
    reward -= weights.length * max(0, words - weights.free_words) / 100
    reward -= weights.repeat * (len(already) / len(mentioned) if mentioned else 0.0)
    return Score(precision, recall, f1, risk_recall, tuple(sorted(mentioned)), tuple(sorted(already)), words, reward)
