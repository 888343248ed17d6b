"""The RL prompt refiner's policy: her state -> a factorised distribution over the prompt parameters.

One small MLP trunk, one categorical head per prompt factor (see common/prompt.FACTORS), and a value
head used as the learned baseline for REINFORCE. Plain Linear layers, so Opacus can clip per-sample
gradients for DP policy updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from pmlm.common.assemble.render import FACTORS, PromptParams

FACTOR_NAMES = list(FACTORS)
STATE_EXTRAS = ("top1_prob", "top5_mean_prob", "peer_agreement", "log_history", "gest_week", "postpartum",
                "has_peers", "has_predictions")


@dataclass
class PolicyState:
    """Numbers that describe her situation; built on-site, never sent."""

    embedding: np.ndarray
    top1_prob: float = 0.0
    top5_mean_prob: float = 0.0
    peer_agreement: float = 0.0  # overlap of her top-5 predictions with her peers' top-5
    history_length: int = 0
    gestational_week: float | None = None
    weeks_postpartum: float | None = None
    has_peers: bool = False

    def vector(self) -> np.ndarray:
        extras = [self.top1_prob, self.top5_mean_prob, self.peer_agreement, np.log1p(self.history_length) / 8,
                  (self.gestational_week or 0.0) / 40, 1.0 if self.weeks_postpartum is not None else 0.0,
                  1.0 if self.has_peers else 0.0, 1.0 if self.top1_prob > 0 else 0.0]
        return np.concatenate([np.asarray(self.embedding, dtype=np.float32), np.asarray(extras, np.float32)])


class PromptPolicy(nn.Module):
    def __init__(self, embedding_dim: int, hidden: int = 32):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.trunk = nn.Sequential(nn.Linear(embedding_dim + len(STATE_EXTRAS), hidden), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(FACTORS[name])) for name in FACTOR_NAMES})
        self.value = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.trunk(states)
        return {name: head(h) for name, head in self.heads.items()}, self.value(h).squeeze(-1)

    def distribution(self, states: torch.Tensor, temperature: float = 1.0) -> dict[str, Categorical]:
        logits, _ = self(states)
        return {name: Categorical(logits=lg / temperature) for name, lg in logits.items()}

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Sum over factors of log pi_T(a_f | s); `actions` is (batch, factors) of option indices."""
        dists = self.distribution(states, temperature)
        return sum(dists[name].log_prob(actions[:, i]) for i, name in enumerate(FACTOR_NAMES))

    @torch.no_grad()
    def sample(self, state: PolicyState, generator: torch.Generator | None = None, n: int = 1,
               temperature: float = 1.0) -> list[PromptParams]:
        """n draws; a temperature above 1 flattens every factor's distribution (exploration during training)."""
        x = torch.as_tensor(state.vector()).unsqueeze(0).repeat(n, 1)
        logits, _ = self(x)
        picks = {name: torch.multinomial(torch.softmax(lg / temperature, -1), 1, generator=generator).squeeze(-1)
                 for name, lg in logits.items()}
        return [PromptParams.from_indices({name: int(picks[name][i]) for name in FACTOR_NAMES}) for i in range(n)]

    @torch.no_grad()
    def best(self, state: PolicyState) -> PromptParams:
        """The refined prompt for her: the most likely option of every factor."""
        logits, _ = self(torch.as_tensor(state.vector()).unsqueeze(0))
        return PromptParams.from_indices({name: int(lg.argmax(-1)) for name, lg in logits.items()})


def action_tensor(params: list[PromptParams]) -> torch.Tensor:
    return torch.tensor([[p.as_indices()[name] for name in FACTOR_NAMES] for p in params], dtype=torch.long)


def action_onehot(params: PromptParams) -> np.ndarray:
    """One-hot of every factor's option: the reward model's view of a prompt."""
    parts = []
    for name in FACTOR_NAMES:
        v = np.zeros(len(FACTORS[name]), np.float32)
        v[params.as_indices()[name]] = 1.0
        parts.append(v)
    return np.concatenate(parts)


# Which weights a policy update may move. "head-biases": only each factor's state-independent preference.
# A DP update adds the same noise to every weight it covers; over the ~2.5k weights of the trunk and heads
# that noise changes the choice for some states (a quarter of the demo's test points lost their own
# predicted events, F1 0.19 -> 0.12), while the few dozen biases move every state's choice together.
TRAINED_WEIGHTS = ("all", "head-biases")


def trained_mask(policy: PromptPolicy, trains: str) -> np.ndarray:
    """Bool mask over the flat parameter vector (torch's parameters_to_vector order) of the weights updated."""
    if trains not in TRAINED_WEIGHTS:
        raise ValueError(f"trains must be one of {TRAINED_WEIGHTS}, got {trains!r}")
    parts = [np.full(p.numel(), trains == "all" or (name.startswith("heads.") and name.endswith(".bias")))
             for name, p in policy.named_parameters()]
    return np.concatenate(parts)


def initial_bias(policy: PromptPolicy, params: PromptParams, strength: float = 2.0) -> None:
    """Start the policy at the initial personalised prompt: its options get a head start."""
    with torch.no_grad():
        for name, head in policy.heads.items():
            head.bias.zero_()
            head.bias[params.as_indices()[name]] = strength


def apply_update(policy: PromptPolicy, total_gradient: np.ndarray, lr: float, scale: float) -> None:
    """One gradient step: move the policy against a summed gradient divided by `scale`. The coordinator's FedSGD
    step on the sites' noisy sum (server/phase_c.py), and a site's own step when it refines the policy locally."""
    with torch.no_grad():
        vec = torch.nn.utils.parameters_to_vector(policy.parameters())
        vec -= lr * torch.as_tensor(total_gradient, dtype=vec.dtype) / scale
        torch.nn.utils.vector_to_parameters(vec, policy.parameters())
