"""Phase C's contract: its settings, message names and the prompt policy's codec. Phase C refines the prompt
policy by reinforcement learning at each site, with DP on each site's summed policy-gradient update (FedSGD):
client/phase_c.py is a site's side, server/phase_c.py the coordinator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

# The policy is a torch module (2-5 s to import). Each message of phase C starts a fresh ClientApp process under the
# Deployment Engine, and only the ones that compute or store a policy need it: the codec imports it when called.
if TYPE_CHECKING:
    from pmlm.common.assemble.policy import PromptPolicy

PHASE = "phase_c"
QUERY_ROUND = "query.phase_c_round"  # one round's noisy update of a site (a plain sum)
QUERY_STORE = "query.phase_c_store"  # the final policy, kept at every site
VECTOR_TASK = "phase_c_round"  # the same update as a secure-sum vector task (SecAgg+)
RUN_CONFIG_KEYS = {"phase-c-rounds": "rounds", "phase-c-points": "points_per_site", "phase-c-rate": "sampling_rate",
                   "phase-c-candidates": "candidates", "phase-c-reward-model": "use_reward_model",
                   "phase-c-max-tokens": "max_tokens", "phase-c-trains": "trains"}


@dataclass(frozen=True)
class PhaseCConfig:
    # Few rounds over many points: each round is one Gaussian release, and at a fixed budget the noise per
    # round grows with the number of rounds while the signal grows with the patients in a round. Two rounds
    # of n points have the signal-to-noise ratio of one round of n (sigma grows about sqrt(2) per doubling of
    # releases, and the two rounds' noises add), at the LLM calls of one round of 2n, which has twice it.
    rounds: int = 1
    # Each training patient takes part in a round with this public probability (Poisson sampling by a keyed
    # PRF): a site's count of participants is its own, never fixed by the coordinator nor sent.
    sampling_rate: float = 0.25
    # The coordinator's step divides the summed update by sites x this public number (not by the sites' true
    # counts, which are private): about what the rate gives on the sample's ~90 training patients a site.
    points_per_site: int = 24
    prompts_per_point: int = 2  # compared with each other: a baseline of her own
    # Prompts are drawn from the policy itself (temperature 1): then the other factors of a drawn prompt mostly sit
    # at the policy's choice, and the pairs measure each option where the refined prompt will use it. At 2 most
    # prompts sat in the wrong turn (placement), where a different format works best: bench/rl.py's DP run moved
    # the format from the checklist to three sentences and the refined prompt's F1 fell from 0.185 to 0.091.
    explore_temperature: float = 1.0
    reward_scale: float = 10.0  # rewards differ by ~0.1 between prompts: scaled, her gradient reaches the clip
    candidates: int = 6
    # The reward model is fitted on all patients' rewards, so with it one patient's gradient would depend on the
    # others' and the released sum's sensitivity would exceed the clip the ledger charges for: refused here.
    use_reward_model: bool = False
    clip: float = 1.0
    # Released updates move only the heads' biases: the factors' preferences for every state together. The
    # state-dependent weights would need far more patients than a site has for their noise to leave the
    # initial prompt's choices alone (common/assemble/policy.py, TRAINED_WEIGHTS).
    trains: str = "head-biases"
    lr: float = 15.0  # the step on the mean clipped gradient; it must move the initial prompt's 2-logit head start
    # ... but never so far that the DP noise alone moves a weight by more than this (standard deviation) in a
    # round: at 0.25 a round of pure noise leaves 97% of the initial prompt's choices as they were
    # (tests/test_rl.py). At eps 3 per site the noise multiplier is 6.9; uncapped, the demo's rounds (8 points
    # a site) stepped 3.7 and a 3-point run 9.9, and both ended below their initial prompt.
    max_step_noise: float = 0.25
    max_tokens: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        from pmlm.common.assemble.policy import TRAINED_WEIGHTS

        if self.trains not in TRAINED_WEIGHTS:  # at the coordinator's start, before any site spends budget
            raise ValueError(f"phase-c-trains must be one of {TRAINED_WEIGHTS}, got {self.trains!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"phase-c-rate must be in (0, 1], got {self.sampling_rate!r}")

    @classmethod
    def from_run_config(cls, run: dict) -> "PhaseCConfig":
        return cls(**{field: type(getattr(cls(), field))(run[key]) for key, field in RUN_CONFIG_KEYS.items()
                      if key in run})


def policy_arrays(policy: PromptPolicy) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in policy.state_dict().items()})


def policy_from(record: ArrayRecord, embedding_dim: int) -> PromptPolicy:
    return policy_from_numpy({k: record[k].numpy() for k in record.keys()}, embedding_dim)


def policy_from_numpy(arrays: dict, embedding_dim: int) -> PromptPolicy:
    import torch

    from pmlm.common.assemble.policy import PromptPolicy

    policy = PromptPolicy(embedding_dim)
    policy.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    return policy
