"""Phase C at a site: REINFORCE over her prompt parameters, with the LLM's answer scored against the truth.

Per round a site visits some of its training prediction points and tries a few prompts on each (LLM
calls go through the response cache). Each prompt's advantage is its reward minus the mean reward of the
other prompts tried on the same point (a baseline of her own, which removes how hard her case is), so the
policy learns from differences between prompts. Each patient's episodes become one policy-gradient vector,
clipped; the site sums them and adds Gaussian noise: only that noisy sum leaves the site (charged to the
ledger as one Gaussian release).

A reward model learned from the logged answers (client/reward_model.py) pre-screens candidate prompts so
most LLM calls go to promising ones. After a warm-up of plain episodes, only every `calls_every`-th point
visited costs LLM calls (on the reward model's best candidates, which then grow its log); on the other
points the policy learns from the reward model's predicted rewards for all of her candidates, at no call.
It is fitted on every patient's rewards, so a prompt it picks for one patient depends on the others: fine
for refinement that stays on-site, not for released updates, whose per-patient sensitivity would no longer
be the clip (phase C therefore runs without it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pmlm.client.examples import Example
from pmlm.client.llm.cache import cache_key
from pmlm.client.reward import ConceptMatcher, RewardWeights, score_answer
from pmlm.client.reward_model import Answered, reward_model
from pmlm.common.assemble.policy import (
    FACTOR_NAMES,
    PolicyState,
    PromptPolicy,
    action_tensor,
    trained_mask,
)
from pmlm.common.assemble.render import PatientContext, PromptParams, render
from pmlm.common.phase_c import PHASE
from pmlm.common.privacy import SiteLedger
from pmlm.common.privacy.events import Mechanism
from pmlm.common.privacy.kept import release_once, request_digest
from pmlm.common.privacy.noise import noise_source_of
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseSharing


@dataclass
class Point:
    """One training prediction point, ready for episodes (all of it stays on-site)."""

    example: Example
    context: PatientContext
    state: PolicyState


@dataclass
class Episode:
    """One prompt tried on one point."""

    patient_id: str
    state: np.ndarray
    params: PromptParams
    reward: float
    f1: float
    baseline: float | None = None  # mean reward of the other prompts tried on her point; None: the value head
    predicted: bool = False  # the reward is the reward model's prediction, no LLM call: never logged for fitting
    point: Point | None = None  # where it was tried, and what the answer named: the reward model learns from them
    mentioned: tuple[str, ...] = ()
    words: int = 0


@dataclass
class RLConfig:
    episodes_per_round: int = 24  # points visited per round
    prompts_per_point: int = 2  # prompts tried on each point; with 2 or more each has a baseline of her own
    explore_temperature: float = 1.0  # prompts are drawn from softmax(logits / T); the refined prompt is the argmax
    reward_scale: float = 1.0  # fixed (not data-dependent) factor on advantages, so gradients use the clip range
    candidates: int = 8  # prompts proposed per point; the reward model picks which ones cost an LLM call
    use_reward_model: bool = True
    reward_model: str = "answers"  # which one (client/reward_model.REWARD_MODELS)
    warmup_episodes: int = 24  # plain sampling before the reward model is trusted
    explore: float = 0.2  # chance of spending the calls on random candidates anyway
    calls_every: int = 4  # with a trusted reward model, one point in this many costs LLM calls; the rest are predicted
    # (4, not 3: bench/rl.py, 3 seeds, reached the run without the model's final reward with 3.9x fewer calls, 3: 2.9x)
    clip: float = 1.0  # per-patient L2 bound on the policy-gradient vector
    trains: str = "all"  # the weights an update moves (common/policy.TRAINED_WEIGHTS); the others stay exactly 0
    value_weight: float = 0.5
    sampling: dict = field(default_factory=lambda: {"max_tokens": 160, "temperature": 0.0})


class LocalRL:
    def __init__(self, policy: PromptPolicy, llm, matcher: ConceptMatcher, points: list[Point], config: RLConfig,
                 seed: int = 0, weights: RewardWeights = RewardWeights()):
        self.policy = policy
        self.llm = llm
        self.matcher = matcher
        self.points = points
        self.config = config
        self.weights = weights
        self.random = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        # Released rounds draw each patient's prompts from a generator of her own (phase C sets this), so
        # her episodes do not depend on who else was visited before her.
        self.draw_seed: Callable[[Point], int] | None = None
        self.log: list[Episode] = []
        self.requests: set[str] = set()  # keys of the distinct requests this run sent (a cold cache's misses)
        self.reward_model = reward_model(config.reward_model, matcher, weights, seed) if config.use_reward_model \
            else None
        # 1 on the weights this run's updates move, 0 elsewhere (public: it follows from the config)
        self.mask = torch.as_tensor(trained_mask(policy, config.trains), dtype=torch.float32)

    @property
    def llm_calls(self) -> int:
        """LLM calls this run would pay with a cache of its own: its distinct requests. Answers another run
        left in a shared cache do not make this run look cheaper."""
        return len(self.requests)

    def evaluate(self, point: Point, params: PromptParams):
        prompt = render(point.context, params)
        self.requests.add(cache_key({"messages": prompt.messages, "sampling": self.config.sampling}))
        # An empty answer names nothing, so it scores 0: the policy learns that this prompt form fails.
        answer = self.llm.chat(prompt.messages, allow_empty=True, **self.config.sampling)
        return score_answer(answer.text, point.example, self.matcher, self.weights)

    def _draw(self, point: Point, n: int) -> list[PromptParams]:
        """Up to n distinct prompts from the policy at the exploration temperature (fewer if it is peaked)."""
        generator = self.generator if self.draw_seed is None else torch.Generator().manual_seed(self.draw_seed(point))
        drawn = self.policy.sample(point.state, generator, n=n, temperature=self.config.explore_temperature)
        return list(dict.fromkeys(drawn))

    def choose(self, point: Point) -> list[PromptParams]:
        k = self.config.prompts_per_point
        if not self.screening:
            return self._draw(point, 4 * k)[:k]
        candidates = self._draw(point, self.config.candidates)
        if self.random.random() < self.config.explore:
            return self.random.sample(candidates, min(k, len(candidates)))
        scores = self.reward_model.predict(point, candidates)
        return [candidates[i] for i in np.argsort(-scores, kind="stable")[:k]]

    @property
    def screening(self) -> bool:
        """Whether the reward model is trusted yet (fitted on at least the warm-up's episodes)."""
        return self.reward_model is not None and self.reward_model.fitted >= self.config.warmup_episodes

    def predicted_episodes(self, point: Point) -> list[Episode]:
        """Her candidates scored by the reward model instead of the LLM, each against the mean of the others."""
        candidates = self._draw(point, self.config.candidates)
        predicted = self.reward_model.predict(point, candidates)
        out = []
        for i, params in enumerate(candidates):
            others = np.delete(predicted, i)
            out.append(Episode(point.example.patient_id, point.state.vector(), params, float(predicted[i]),
                               float("nan"), float(others.mean()) if len(others) else None, predicted=True))
        return out

    def run_episodes(self, n: int | None = None) -> list[Episode]:
        """One round: n points visited, each with LLM calls or, once the reward model screens, most predicted. The
        model takes over within the round, as soon as the log holds the warm-up's answers."""
        n = n or self.config.episodes_per_round
        every = max(self.config.calls_every, 1)
        episodes, logged = [], len(self.log)
        since_call = every - 1  # points predicted since the last one that cost calls: the first screened one pays
        for point in self.random.sample(self.points, min(n, len(self.points))):
            if self.screening and since_call < every - 1:
                episodes += self.predicted_episodes(point)
                since_call += 1
                continue
            since_call = 0
            tried = [(params, self.evaluate(point, params)) for params in self.choose(point)]
            rewards = [score.reward for _, score in tried]
            for j, (params, score) in enumerate(tried):
                others = rewards[:j] + rewards[j + 1:]
                episode = Episode(point.example.patient_id, point.state.vector(), params, score.reward, score.f1,
                                  float(np.mean(others)) if others else None, point=point,
                                  mentioned=score.mentioned, words=score.words)
                episodes.append(episode)
                self.log.append(episode)
            if self.reward_model is not None and not self.screening and len(self.log) >= self.config.warmup_episodes:
                self._fit()
        if self.reward_model is not None and self.screening and len(self.log) > logged:
            self._fit()  # refitted on this round's answers too
        return episodes

    def _fit(self) -> None:
        self.reward_model.fit([Answered(e.point, e.params, e.reward, e.mentioned, e.words) for e in self.log[-400:]])

    def patient_gradients(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """One flat REINFORCE-with-baseline gradient per patient (her episodes together). The baseline is her
        own other prompts' mean reward, else the value head (which then also learns from her)."""
        by_patient: dict[str, list[Episode]] = {}
        for e in episodes:
            by_patient.setdefault(e.patient_id, []).append(e)
        grads = []
        params = [p for p in self.policy.parameters()]
        for eps in by_patient.values():
            states = torch.as_tensor(np.stack([e.state for e in eps]))
            actions = action_tensor([e.params for e in eps])
            rewards = torch.tensor([e.reward for e in eps], dtype=torch.float32)
            own = torch.tensor([np.nan if e.baseline is None else e.baseline for e in eps], dtype=torch.float32)
            use_value = torch.isnan(own)
            _, values = self.policy(states)
            baseline = torch.where(use_value, values.detach(), own)
            advantage = (rewards - baseline) * self.config.reward_scale
            log_prob = self.policy.log_prob(states, actions, self.config.explore_temperature)
            loss = -(advantage * log_prob).sum() \
                + self.config.value_weight * (((values - rewards) ** 2) * use_value).sum()
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([x.reshape(-1) for x in g]) * self.mask)
        return grads

    def clipped_sum(self, episodes: list[Episode]) -> np.ndarray:
        """Sum of per-patient gradients, each clipped to L2 norm <= clip: one patient moves it by <= clip."""
        total = np.zeros(n_parameters(self.policy))
        for g in self.patient_gradients(episodes):
            total += (g * min(1.0, self.config.clip / max(float(g.norm()), 1e-12))).numpy()
        return total

    def noisy_update(self, episodes: list[Episode], ledger: SiteLedger, mechanism: Mechanism,
                     rng: np.random.Generator, *, round: int, run_id: str, noise: NoiseSharing = SITE_NOISE,
                     **group) -> tuple[np.ndarray, dict]:
        """Clip each patient's gradient, sum, add noise after the ledger allows it; the only thing sent.
        `mechanism` describes the release (its noise std is noise multiplier x clip); `noise` is the site's
        share of that noise (common/privacy/shared_noise.py), which is what is drawn here."""
        sensitivity = getattr(mechanism, "clipping_norm", getattr(mechanism, "l2_sensitivity", None))
        if sensitivity != self.config.clip:
            raise ValueError(f"the release's sensitivity ({sensitivity}) must be the per-patient clip ({self.config.clip})")
        total = self.clipped_sum(episodes)
        noise_std = noise.own_stddev(mechanism)

        def draw() -> np.ndarray:  # weights the update does not move are sent as exact zeros, noise-free
            return total + rng.normal(0.0, noise_std, size=total.shape) * self.mask.numpy()

        # A round asked for again (a retried secure sum) resends this release: the request is the policy it had.
        policy = torch.nn.utils.parameters_to_vector(self.policy.parameters()).detach().numpy()
        return release_once(ledger, PHASE, mechanism, draw, round=round, run_id=run_id, request=request_digest(policy),
                            extra={"release": "policy_gradient_sum"}, noise_source=noise_source_of(rng), noise=noise,
                            **group)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Point", "Episode", "RLConfig", "LocalRL", "n_parameters", "FACTOR_NAMES", "PHASE"]
