"""One hospital's side of phase C, Flower-free: RL episodes on its own training points through its own
LLM, and one clipped, noised policy-gradient sum per round (charged to the ledger).

Who takes part in a round is Poisson sampling at a public rate by a keyed PRF (client/sampling.py), and each
patient's point and prompt draws come from her own keyed generator: adding or removing one patient changes
the sum by at most her clipped gradient, the sensitivity the ledger charges (as a Poisson-subsampled
Gaussian). Only the noisy sum and public figures (the noise's standard deviation) leave the site.

The LLM is the site's configured endpoint or the embedded local server, opened once per process.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmlm.client.advice import PromptAssembler, SiteArtifacts, save_policy
from pmlm.client.examples import Example
from pmlm.client.reward import matcher_for
from pmlm.client.rl import PHASE, LocalRL, Point, RLConfig
from pmlm.client.sampling import keyed_seed, site_sampling_key, takes_part
from pmlm.common.atomic import write_atomic
from pmlm.common.policy import TRAINED_WEIGHTS, PromptPolicy
from pmlm.common.privacy import BudgetConfig, DpSgd, SiteLedger
from pmlm.common.privacy.noise import SecureNormal
from pmlm.common.profiles import load_profile

_LLMS: dict[str, object] = {}
_STACK = contextlib.ExitStack()


def site_llm(llm_settings: dict | None = None):
    """One LLM client per configuration per process (the embedded server starts once)."""
    from pmlm.client.llm import LLMConfig, open_llm

    key = repr(sorted((llm_settings or {}).items()))
    if key not in _LLMS:
        config = LLMConfig.from_dict(llm_settings) if llm_settings else LLMConfig()
        _LLMS[key] = _STACK.enter_context(open_llm(config))
    return _LLMS[key]


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
    # initial prompt's choices alone (common/policy.py, TRAINED_WEIGHTS).
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
        if self.trains not in TRAINED_WEIGHTS:  # at the coordinator's start, before any site spends budget
            raise ValueError(f"phase-c-trains must be one of {TRAINED_WEIGHTS}, got {self.trains!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"phase-c-rate must be in (0, 1], got {self.sampling_rate!r}")

    def rl_config(self, use_reward_model: bool = False) -> RLConfig:
        """Local RL with these settings; the reward model only for refinement that releases nothing."""
        return RLConfig(episodes_per_round=self.points_per_site, prompts_per_point=self.prompts_per_point,
                        explore_temperature=self.explore_temperature, reward_scale=self.reward_scale,
                        candidates=self.candidates, use_reward_model=use_reward_model, clip=self.clip,
                        trains=self.trains,
                        sampling={"max_tokens": self.max_tokens, "temperature": 0.0})


def _by_patient(examples: list[Example]) -> dict[str, list[Example]]:
    by_patient: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.split == "train" and ex.targets:
            by_patient.setdefault(ex.patient_id, []).append(ex)
    return by_patient


def _points(assembler: PromptAssembler, chosen: list[Example]) -> list[Point]:
    points = []
    for ex in chosen:
        ctx, state = assembler.context(ex, None)
        if state is not None:
            points.append(Point(ex, ctx, state))
    return points


def training_points(assembler: PromptAssembler, examples: list[Example], n: int, seed: int) -> list[Point]:
    """A seeded sample of n training prediction points (at most one per patient), with contexts and states:
    for on-site refinement and benchmarks, whose results never leave the site (it depends on every patient)."""
    by_patient = _by_patient(examples)
    rng = random.Random(seed)
    chosen = [rng.choice(by_patient[p]) for p in sorted(by_patient)]
    rng.shuffle(chosen)
    return _points(assembler, chosen[:n])


def sampled_points(assembler: PromptAssembler, examples: list[Example], key: bytes, rate: float, run_id: str,
                   round: int) -> list[Point]:
    """The points of a released round: each patient in with probability `rate`, with one of her points, both
    by the site's keyed PRF of her own id (client/sampling.py): nobody's part depends on anybody else."""
    chosen = []
    for patient, exs in sorted(_by_patient(examples).items()):
        if takes_part(key, rate, run_id, round, patient):
            chosen.append(exs[keyed_seed(key, "point", run_id, round, patient) % len(exs)])
    return _points(assembler, chosen)


class SitePhaseC:
    def __init__(self, site_id: str, site_dir: Path, examples: list[Example], profile_name: str,
                 config: PhaseCConfig, run_id: str, llm_settings: dict | None = None,
                 budget: BudgetConfig | None = None, phase_cap: float | None = None):
        self.site_id, self.site_dir, self.config, self.run_id = site_id, Path(site_dir), config, run_id
        if config.use_reward_model:
            raise ValueError("phase C releases per-patient clipped updates; a reward model fitted on every patient's "
                             "rewards would make each update depend on the others: run it without (use_reward_model "
                             "false) and use the reward model only for on-site refinement")
        profile = load_profile(profile_name)
        self.artifacts = SiteArtifacts.load(self.site_dir, profile)
        if self.artifacts.model is None:
            raise RuntimeError(f"site {site_id}: phase C needs the phase A global model at {site_dir}")
        self.assembler = PromptAssembler(self.artifacts)
        self.examples = examples
        self.key = site_sampling_key(self.site_dir)
        self.ledger = SiteLedger(self.site_dir, site_id, budget)
        self.phase_cap = phase_cap  # at most what the run asked for (the policy caps the phase itself)
        self.llm = site_llm(llm_settings)
        self.rng = SecureNormal()
        self.sigma: float | None = None
        self.rewards: list[float] = []
        self.rl: LocalRL | None = None

    def noise_multiplier(self) -> float:
        """Calibrated once per run and kept on disk: a node may run each message in a fresh process."""
        plan = self.site_dir / "phase_c" / f"plan-{self.run_id}.json"
        if self.sigma is None and plan.exists():
            self.sigma = float(json.loads(plan.read_text())["noise_multiplier"])
        if self.sigma is None:
            self.sigma = self.ledger.calibrate(PHASE, lambda s: [self.mechanism(s)] * self.config.rounds,
                                               phase_cap=self.phase_cap)
            write_atomic(plan, json.dumps({"run_id": self.run_id, "noise_multiplier": self.sigma}))
        return self.sigma

    def mechanism(self, noise_multiplier: float) -> DpSgd:
        """One round's release: the clipped sum over a Poisson sample at the public rate, plus Gaussian noise."""
        return DpSgd(noise_multiplier, self.config.sampling_rate, 1, self.config.clip)

    def round(self, policy: PromptPolicy, round: int, **group) -> tuple[np.ndarray, dict, dict]:
        """Episodes with the global policy on this round's sampled patients, then the noisy update; returns
        (vector, ledger entry, public figures). `group`: see PhaseBSite.release."""
        c = self.config
        points = sampled_points(self.assembler, self.examples, self.key, c.sampling_rate, self.run_id, round)
        if self.rl is None:
            self.rl = LocalRL(policy, self.llm, matcher_for(self.artifacts.profile.name), points, c.rl_config())
        self.rl.points = points
        # Her prompt draws from her own keyed generator: the same whoever else takes part.
        self.rl.draw_seed = lambda point: keyed_seed(self.key, "draws", self.run_id, round, point.example.patient_id)
        self.rl.policy.load_state_dict(policy.state_dict())
        episodes = self.rl.run_episodes(len(points)) if points else []
        mechanism = self.mechanism(self.noise_multiplier())
        vector, entry = self.rl.noisy_update(episodes, self.ledger, mechanism, self.rng, round=round,
                                             run_id=self.run_id, **group)
        self.rewards.append(float(np.mean([e.reward for e in episodes])) if episodes else 0.0)  # on-site only
        # The noise's standard deviation is public (the ledger entry's); the coordinator sizes its step by it.
        return vector, entry, {"noise-std": float(mechanism.noise_stddev)}



def store_policy(site_dir: Path, ledger: SiteLedger, run_id: str, policy: PromptPolicy, plan: dict) -> Path:
    """Keep the global policy with this site's phase C releases of the run (read from the ledger)."""
    from pmlm.client.phase_b import write_phase_manifest

    path = save_policy(policy, site_dir, {"run_id": run_id, "site_id": ledger.site_id, "config": plan})
    write_phase_manifest(site_dir, ledger, PHASE, run_id, {"policy": "policy.pt"})
    return path
