"""Phase C at a site: REINFORCE over her prompt parameters, with the LLM's answer scored against the truth.

Per round a site runs episodes on its training prediction points (LLM calls go through the response
cache), turns each patient's episodes into one policy-gradient vector, clips it, sums, and adds Gaussian
noise: only that noisy sum leaves the site (charged to the ledger as one Gaussian release).
A reward model learned from the logged (state, prompt, reward) triples pre-screens candidate prompts so
most LLM calls go to promising ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pmlm.client.examples import Example
from pmlm.client.reward import ConceptMatcher, RewardWeights, score_answer
from pmlm.common.policy import FACTOR_NAMES, PolicyState, PromptPolicy, action_onehot, action_tensor
from pmlm.common.privacy import GaussianRelease, SiteLedger
from pmlm.common.privacy.kept import release_once, request_digest
from pmlm.common.prompt import PatientContext, PromptParams, render

PHASE = "phase_c"
NOISE_SOURCE = "numpy PCG64 seeded from OS entropy (not a cryptographic RNG)"


@dataclass
class Point:
    """One training prediction point, ready for episodes (all of it stays on-site)."""

    example: Example
    context: PatientContext
    state: PolicyState


@dataclass
class Episode:
    patient_id: str
    state: np.ndarray
    params: PromptParams
    reward: float
    f1: float


class RewardModel:
    """Predicts the reward of (state, prompt) from logged episodes; a tiny MLP refitted as logs grow."""

    def __init__(self, state_dim: int, seed: int = 0):
        torch.manual_seed(seed)
        width = state_dim + len(action_onehot(PromptParams()))
        self.net = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 1))
        self.fitted = 0

    def _x(self, state: np.ndarray, params: list[PromptParams]) -> torch.Tensor:
        rows = [np.concatenate([state, action_onehot(p)]) for p in params]
        return torch.as_tensor(np.stack(rows), dtype=torch.float32)

    def fit(self, episodes: list[Episode], epochs: int = 60) -> None:
        x = torch.cat([self._x(e.state, [e.params]) for e in episodes])
        y = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        for _ in range(epochs):
            opt.zero_grad()
            loss = ((self.net(x).squeeze(-1) - y) ** 2).mean()
            loss.backward()
            opt.step()
        self.fitted = len(episodes)

    @torch.no_grad()
    def predict(self, state: np.ndarray, params: list[PromptParams]) -> np.ndarray:
        return self.net(self._x(state, params)).squeeze(-1).numpy()


@dataclass
class RLConfig:
    episodes_per_round: int = 24
    candidates: int = 8  # prompts proposed per point; the reward model picks which one costs an LLM call
    use_reward_model: bool = True
    warmup_episodes: int = 24  # plain sampling before the reward model is trusted
    explore: float = 0.2  # chance of spending the call on a random candidate anyway
    clip: float = 1.0  # per-patient L2 bound on the policy-gradient vector
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
        self.log: list[Episode] = []
        self.llm_calls = 0
        state_dim = len(points[0].state.vector()) if points else 0
        self.reward_model = RewardModel(state_dim, seed) if config.use_reward_model else None

    def evaluate(self, point: Point, params: PromptParams):
        prompt = render(point.context, params)
        # An empty answer names nothing, so it scores 0: the policy learns that this prompt form fails.
        answer = self.llm.chat(prompt.messages, allow_empty=True, **self.config.sampling)
        self.llm_calls += 0 if answer.cached else 1
        return score_answer(answer.text, point.example, self.matcher, self.weights)

    def choose(self, point: Point) -> PromptParams:
        rm = self.reward_model
        if rm is None or len(self.log) < self.config.warmup_episodes:
            return self.policy.sample(point.state, self.generator)[0]
        candidates = self.policy.sample(point.state, self.generator, n=self.config.candidates)
        if self.random.random() < self.config.explore:
            return self.random.choice(candidates)
        scores = rm.predict(point.state.vector(), candidates)
        return candidates[int(np.argmax(scores))]

    def run_episodes(self, n: int | None = None) -> list[Episode]:
        n = n or self.config.episodes_per_round
        episodes = []
        for point in self.random.sample(self.points, min(n, len(self.points))):
            params = self.choose(point)
            score = self.evaluate(point, params)
            episodes.append(Episode(point.example.patient_id, point.state.vector(), params, score.reward, score.f1))
        self.log += episodes
        if self.reward_model is not None and len(self.log) >= self.config.warmup_episodes:
            self.reward_model.fit(self.log[-400:])
        return episodes

    def patient_gradients(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """One flat REINFORCE-with-baseline gradient per patient (her episodes together)."""
        by_patient: dict[str, list[Episode]] = {}
        for e in episodes:
            by_patient.setdefault(e.patient_id, []).append(e)
        grads = []
        params = [p for p in self.policy.parameters()]
        for eps in by_patient.values():
            states = torch.as_tensor(np.stack([e.state for e in eps]))
            actions = action_tensor([e.params for e in eps])
            rewards = torch.tensor([e.reward for e in eps], dtype=torch.float32)
            _, values = self.policy(states)
            advantage = rewards - values.detach()
            loss = -(advantage * self.policy.log_prob(states, actions)).sum() \
                + self.config.value_weight * ((values - rewards) ** 2).sum()
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([x.reshape(-1) for x in g]))
        return grads

    def clipped_sum(self, episodes: list[Episode]) -> np.ndarray:
        """Sum of per-patient gradients, each clipped to L2 norm <= clip: one patient moves it by <= clip."""
        total = np.zeros(n_parameters(self.policy))
        for g in self.patient_gradients(episodes):
            total += (g * min(1.0, self.config.clip / max(float(g.norm()), 1e-12))).numpy()
        return total

    def noisy_update(self, episodes: list[Episode], ledger: SiteLedger, noise_multiplier: float,
                     rng: np.random.Generator, *, round: int, run_id: str) -> tuple[np.ndarray, dict]:
        """Clip each patient's gradient, sum, add noise after the ledger allows it; the only thing sent."""
        total = self.clipped_sum(episodes)
        mechanism = GaussianRelease(noise_multiplier, self.config.clip)

        def draw() -> np.ndarray:
            return total + rng.normal(0.0, mechanism.noise_stddev, size=total.shape)

        # A round asked for again (a retried secure sum) resends this release: the request is the policy it had.
        policy = torch.nn.utils.parameters_to_vector(self.policy.parameters()).detach().numpy()
        return release_once(ledger, PHASE, mechanism, draw, round=round, run_id=run_id, request=request_digest(policy),
                            extra={"release": "policy_gradient_sum"}, noise_source=NOISE_SOURCE)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_update(policy: PromptPolicy, total_gradient: np.ndarray, lr: float, scale: float) -> None:
    """Server side of a FedSGD step: move the global policy against the (summed, noisy) gradient."""
    with torch.no_grad():
        vec = torch.nn.utils.parameters_to_vector(policy.parameters())
        vec -= lr * torch.as_tensor(total_gradient, dtype=vec.dtype) / scale
        torch.nn.utils.vector_to_parameters(vec, policy.parameters())


__all__ = ["Point", "Episode", "RewardModel", "RLConfig", "LocalRL", "apply_update", "n_parameters",
           "FACTOR_NAMES", "PHASE"]
