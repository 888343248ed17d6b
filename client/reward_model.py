"""Reward models for on-site refinement: guess a prompt's reward at a training point without asking the LLM.

Two, chosen by name (`RLConfig.reward_model`):

- "options": ridge regression of the reward on the prompt's options. It knows nothing about the patient, so it
  can only learn which options pay on average, and each LLM answer teaches it one number.
- "answers": models the LLM instead of the reward. For every concept the prompt could make the answer name, the
  chance that it does, from where the prompt states it (her predicted events and at which rank, the peer
  facts, elsewhere in the prompt, or nowhere) and the prompt's options. The reward is then computed exactly as
  client/reward.py computes it, against the point's own targets, over draws of the answer's concepts. Each
  answer teaches it one yes/no per concept, and what a prompt states differs from patient to patient, so it
  can tell that eight predicted events help the woman whose eight include her next exams and not another.

Both see only training points and their answers, and stay on-site with the refinement (client/rl.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pmlm.client.reward import ConceptMatcher, RewardWeights
from pmlm.common.assemble.policy import action_onehot
from pmlm.common.assemble.render import PromptParams, render

REWARD_MODELS = ("options", "answers")


@dataclass(frozen=True)
class Answered:
    """One logged LLM answer, as a reward model learns from it."""

    point: object  # client.rl.Point
    params: PromptParams
    reward: float
    mentioned: tuple[str, ...]  # the concepts the answer named
    words: int


class OptionsModel:
    """Ridge regression of each answer's reward on the prompt's options. Linear on purpose: a few dozen noisy
    rewards can tell apart how much each option adds, not more. Rewards are taken as they are, not relative to the
    other prompt tried on her point: once the policy is sure of an option, both prompts of a point share it and
    their difference says nothing more about it, while the earlier, varied episodes still do."""

    def __init__(self, ridge: float = 1.0, of: str = "reward"):
        self.ridge = ridge
        self.of = of  # the field of each answer it regresses: its reward, or (for the answers model) its words
        self.weights: np.ndarray | None = None
        self.fitted = 0

    @staticmethod
    def _x(params: list[PromptParams]) -> np.ndarray:
        return np.stack([np.append(action_onehot(p), 1.0) for p in params])

    def fit(self, answered: list[Answered]) -> None:
        x = self._x([a.params for a in answered])
        y = np.array([float(getattr(a, self.of)) for a in answered])
        self.weights = np.linalg.solve(x.T @ x + self.ridge * np.eye(x.shape[1]), x.T @ y)
        self.fitted = len(answered)

    def predict(self, point, params: list[PromptParams]) -> np.ndarray:
        return self._x(params) @ self.weights


# Where a concept stands in a prompt. A predicted event's rank counts too: small models name the first items.
SELF, PEER, ELSEWHERE, ABSENT = range(4)
PLACES = 4
RANKS = 8


class AnswersModel:
    """P(the answer names concept c | prompt) by logistic regression, then the expected reward over draws.

    Features of (prompt, c): where c stands (one of PLACES), its rank among her predicted events, the prompt's
    options crossed with where c stands (a format may make the model repeat the list but not the peers), and, for
    a concept the prompt does not state, which concept it is (a small model names some common exams unprompted).
    Only concepts some answer has named, or that the prompt states, or that are her targets or risks, are
    modelled; any other concept is taken never to be named (no answer in the log ever named it)."""

    def __init__(self, matcher: ConceptMatcher, weights: RewardWeights = RewardWeights(), ridge: float = 1.0,
                 draws: int = 64, seed: int = 0):
        self.matcher = matcher
        self.reward_weights = weights
        self.ridge = ridge
        self.draws = draws
        self.seed = seed
        self.vocabulary: dict[str, int] = {}  # concepts some logged answer named -> their own feature
        self.coef: np.ndarray | None = None
        self.words: OptionsModel | None = None  # answer length from the options (the length penalty)
        self.fitted = 0
        self._places: dict[tuple, tuple[object, dict[str, tuple[int, int]]]] = {}

    # -- where each concept stands in a prompt ---------------------------------------------------------------
    def places(self, point, params: PromptParams) -> dict[str, tuple[int, int]]:
        """concept -> (place, rank) for every concept the rendered prompt states; rank 0 outside her events."""
        key = (id(point), params)  # the point is kept with its entry, so its id is not reused while cached
        if key not in self._places:
            prompt = render(point.context, params)
            found: dict[str, tuple[int, int]] = {}
            for rank, (name, _) in enumerate(prompt.predictions, start=1):
                for c in self.matcher.mentioned(name):
                    found.setdefault(c, (SELF, rank))
            for fact in prompt.peer_facts[1:]:  # the first line is the "Among about N ..." header
                for c in self.matcher.mentioned(fact):
                    found.setdefault(c, (PEER, 0))
            for c in self.matcher.mentioned(" ".join(m["content"] for m in prompt.messages)):
                found.setdefault(c, (ELSEWHERE, 0))
            self._places[key] = (point, found)
        return self._places[key][1]

    def _concepts(self, point, params: PromptParams) -> list[str]:
        ex = point.example
        return sorted(set(self.places(point, params)) | set(self.vocabulary) | set(ex.targets) | set(ex.risks))

    def _features(self, point, params: PromptParams, concepts: list[str]) -> np.ndarray:
        options = action_onehot(params)
        n_opt = len(options)
        width = PLACES + RANKS + PLACES * n_opt + len(self.vocabulary)
        x = np.zeros((len(concepts), width), np.float32)
        places = self.places(point, params)
        for i, c in enumerate(concepts):
            place, rank = places.get(c, (ABSENT, 0))
            x[i, place] = 1.0
            if rank:
                x[i, PLACES + min(rank, RANKS) - 1] = 1.0
            start = PLACES + RANKS + place * n_opt
            x[i, start:start + n_opt] = options
            if place == ABSENT and c in self.vocabulary:
                x[i, PLACES + RANKS + PLACES * n_opt + self.vocabulary[c]] = 1.0
        return x

    def fit(self, answered: list[Answered]) -> None:
        self.vocabulary = {c: i for i, c in enumerate(sorted({c for a in answered for c in a.mentioned}))}
        xs, ys = [], []
        for a in answered:
            concepts = self._concepts(a.point, a.params)
            xs.append(self._features(a.point, a.params, concepts))
            named = set(a.mentioned)
            ys.append(np.array([c in named for c in concepts], np.float64))
        x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
        self.coef = _logistic(x, y, self.ridge, start=self.coef if self.coef is not None
                              and len(self.coef) == x.shape[1] else None)
        self.words = OptionsModel(ridge=self.ridge, of="words")
        self.words.fit(answered)
        self.fitted = len(answered)

    def probabilities(self, point, params: PromptParams) -> tuple[list[str], np.ndarray]:
        concepts = self._concepts(point, params)
        logits = self._features(point, params, concepts).astype(np.float64) @ self.coef
        return concepts, 1.0 / (1.0 + np.exp(-logits))

    def predict(self, point, params: list[PromptParams]) -> np.ndarray:
        """Each prompt's expected reward at her point. One set of uniform draws per concept serves every prompt of
        the call (common random numbers), so two prompts that state a concept alike draw it alike and their
        difference is the prompts', not the draws'."""
        ex, w = point.example, self.reward_weights
        recent = {h.concept for h in ex.history if h.days_before <= w.repeat_window_days}
        chances = [self.probabilities(point, p) for p in params]
        every = sorted({c for concepts, _ in chances for c in concepts})
        column = {c: i for i, c in enumerate(every)}
        uniform = np.random.default_rng(self.seed).random((self.draws, len(every)))
        words = self.words.predict(point, params)
        out = []
        for (concepts, prob), length in zip(chances, words):
            named = uniform[:, [column[c] for c in concepts]] < prob  # draws x concepts
            target = np.array([c in ex.targets for c in concepts], bool)
            risk = np.array([c in ex.risks for c in concepts], bool)
            repeat = np.array([c in recent and c not in ex.targets for c in concepts], bool)
            n = named.sum(1)
            hits = named[:, target].sum(1)
            precision = np.divide(hits, n, out=np.zeros(self.draws), where=n > 0)
            recall = hits / max(int(target.sum()), 1)
            f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(self.draws),
                           where=precision + recall > 0)
            reward = f1.copy()
            if risk.any():
                reward += w.risk * named[:, risk].sum(1) / risk.sum()
            reward -= w.repeat * np.divide(named[:, repeat].sum(1), n, out=np.zeros(self.draws), where=n > 0)
            reward -= w.length * max(0.0, float(length) - w.free_words) / 100
            out.append(float(reward.mean()))
        return np.array(out)


def _logistic(x: np.ndarray, y: np.ndarray, ridge: float, start: np.ndarray | None = None,
              steps: int = 25) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method (a few hundred features: the Hessian is small)."""
    coef = np.zeros(x.shape[1]) if start is None else start.copy()
    penalty = ridge * np.eye(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ coef)))
        gradient = x.T @ (p - y) + ridge * coef
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        coef -= step
        if np.abs(step).max() < 1e-6:
            break
    return coef


def reward_model(name: str, matcher: ConceptMatcher, weights: RewardWeights = RewardWeights(), seed: int = 0):
    if name == "options":
        return OptionsModel()
    if name == "answers":
        return AnswersModel(matcher, weights, seed=seed)
    raise ValueError(f"reward_model must be one of {REWARD_MODELS}, got {name!r}")
