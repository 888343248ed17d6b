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
from pathlib import Path
from typing import Mapping

import numpy as np

from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts, save_policy
from pmlm.client.examples import Example
from pmlm.client.llm import LLMConfig, open_llm, site_llm_config
from pmlm.client.phase_b import write_phase_manifest
from pmlm.client.reward import matcher_for
from pmlm.client.rl import LocalRL, Point, RLConfig
from pmlm.client.sampling import keyed_seed, site_sampling_key, takes_part
from pmlm.common.assemble.policy import PromptPolicy
from pmlm.common.atomic import write_atomic
from pmlm.common.phase_c import PHASE, PhaseCConfig
from pmlm.common.privacy import BudgetConfig, DpSgd, SiteLedger
from pmlm.common.privacy.noise import SecureNormal
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseSharing
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import plan_file

_LLMS: dict[str, object] = {}
_STACK = contextlib.ExitStack()


def site_llm(llm_settings: dict | None = None, site_dir: Path | None = None):
    """One LLM client per configuration (and site) per process (the embedded server starts once). With a site
    directory, its answers go through the site's own response cache (SITE_DIR/llm_cache)."""
    key = repr((sorted((llm_settings or {}).items()), str(site_dir)))
    if key not in _LLMS:
        if site_dir is not None:
            config = site_llm_config(site_dir, llm_settings)
        else:
            config = LLMConfig.from_dict(llm_settings) if llm_settings else LLMConfig()
        _LLMS[key] = _STACK.enter_context(open_llm(config))
    return _LLMS[key]


def rl_config(plan: PhaseCConfig, use_reward_model: bool = False) -> RLConfig:
    """Local RL with these settings; the reward model only for refinement that releases nothing."""
    return RLConfig(episodes_per_round=plan.points_per_site, prompts_per_point=plan.prompts_per_point,
                    explore_temperature=plan.explore_temperature, reward_scale=plan.reward_scale,
                    candidates=plan.candidates, use_reward_model=use_reward_model, clip=plan.clip,
                    trains=plan.trains,
                    sampling={"max_tokens": plan.max_tokens, "temperature": 0.0})


def _by_patient(examples: list[Example]) -> dict[str, list[Example]]:
    by_patient: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.split == "train" and ex.targets:
            by_patient.setdefault(ex.patient_id, []).append(ex)
    return by_patient


def points_for(assembler: PromptAssembler, chosen: list[Example], timelines: Mapping | None = None) -> list[Point]:
    """`timelines` (patient id -> Timeline): her record's note too, as `pmlm advise` shows it; else none."""
    points = []
    for ex in chosen:
        ctx, state = assembler.context(ex, timelines.get(ex.patient_id) if timelines else None)
        if state is not None:
            points.append(Point(ex, ctx, state))
    return points


def training_points(assembler: PromptAssembler, examples: list[Example], n: int, seed: int,
                    timelines: Mapping | None = None) -> list[Point]:
    """A seeded sample of n training prediction points (at most one per patient), with contexts and states:
    for on-site refinement and benchmarks, whose results never leave the site (it depends on every patient)."""
    by_patient = _by_patient(examples)
    rng = random.Random(seed)
    chosen = [rng.choice(by_patient[p]) for p in sorted(by_patient)]
    rng.shuffle(chosen)
    return points_for(assembler, chosen[:n], timelines)


def sampled_points(assembler: PromptAssembler, examples: list[Example], key: bytes, rate: float, run_id: str,
                   round: int) -> list[Point]:
    """The points of a released round: each patient in with probability `rate`, with one of her points, both
    by the site's keyed PRF of her own id (client/sampling.py): nobody's part depends on anybody else."""
    chosen = []
    for patient, exs in sorted(_by_patient(examples).items()):
        if takes_part(key, rate, run_id, round, patient):
            chosen.append(exs[keyed_seed(key, "point", run_id, round, patient) % len(exs)])
    return points_for(assembler, chosen)


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
        self.llm = site_llm(llm_settings, self.site_dir)
        self.rng = SecureNormal()
        self.sigma: float | None = None
        self.rewards: list[float] = []
        self.rl: LocalRL | None = None

    def noise_multiplier(self) -> float:
        """Calibrated once per run and kept on disk: a node may run each message in a fresh process."""
        plan = self.site_dir / plan_file(PHASE, self.run_id)
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

    def round(self, policy: PromptPolicy, round: int, noise: NoiseSharing = SITE_NOISE,
              **group) -> tuple[np.ndarray, dict, dict]:
        """Episodes with the global policy on this round's sampled patients, then the noisy update; returns
        (vector, ledger entry, public figures). `noise`, `group`: see PhaseBSite.release."""
        c = self.config
        points = sampled_points(self.assembler, self.examples, self.key, c.sampling_rate, self.run_id, round)
        if self.rl is None:
            self.rl = LocalRL(policy, self.llm, matcher_for(self.artifacts.profile.name), points, rl_config(c))
        self.rl.points = points
        # Her prompt draws from her own keyed generator: the same whoever else takes part.
        self.rl.draw_seed = lambda point: keyed_seed(self.key, "draws", self.run_id, round, point.example.patient_id)
        self.rl.policy.load_state_dict(policy.state_dict())
        episodes = self.rl.run_episodes(len(points)) if points else []
        mechanism = self.mechanism(self.noise_multiplier())
        vector, entry = self.rl.noisy_update(episodes, self.ledger, mechanism, self.rng, round=round,
                                             run_id=self.run_id, noise=noise, **group)
        self.rewards.append(float(np.mean([e.reward for e in episodes])) if episodes else 0.0)  # on-site only
        # The site's noise's standard deviation is public (the ledger entry's); the coordinator sizes its step by it.
        return vector, entry, {"noise-std": float(noise.own_stddev(mechanism))}



def store_policy(site_dir: Path, ledger: SiteLedger, run_id: str, policy: PromptPolicy, plan: dict) -> Path:
    """Keep the global policy with this site's phase C releases of the run (read from the ledger)."""
    path = save_policy(policy, site_dir, {"run_id": run_id, "site_id": ledger.site_id, "config": plan})
    write_phase_manifest(site_dir, ledger, PHASE, run_id, {"policy": "policy.pt"})
    return path
