"""On-site refinement of the consortium's prompt policy (#17): what a site learns from its own patients, for them.

After phase C every site holds the consortium's DP prompt policy (phase_c/policy.pt). `refine_site_policy` starts
from it and runs local RL (client/rl.py's loop, with the reward model's pre-screening) on the site's own training
points through its own LLM and response cache. Nothing of it leaves the site, so it needs no DP noise and costs no
budget (DESIGN.md §4, the site level of personalization). It then scores the refined policy and the consortium's on
the site's validation points and keeps the refined one only if its guidance F1 is higher there (or, with
`keep_level`, higher beyond the noise: a paired bootstrap interval over validation patients above 0); otherwise,
and at a site with too few points to tell, the consortium policy stays what the site uses. The refined policy is a
site-only artifact (SITE_DIR/on_site/prompt_policy.pt, with its validation figures and the digest of the
consortium policy it started from): never sent, no ledger entry. `SiteArtifacts.load` (client/assemble/assembler.py)
gives it to `pmlm advise`, `pmlm serve` and the evaluation while it matches the stored consortium policy.

An explicit step, not part of phase C's store message: its ~150 LLM calls take minutes on a CPU, longer than a
coordinator should wait for an acknowledgement, and a deployment may handle each message in a fresh process.
The evaluation pipeline calls it per site after the federated run; an operator runs
`python -m pmlm.client.refine SITE_DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from pmlm.client.assemble.assembler import (
    CONSORTIUM,
    SITE_REFINED,
    PromptAssembler,
    SiteArtifacts,
    policy_file_digest,
    save_policy,
)
from pmlm.client.examples import Example
from pmlm.client.llm import open_llm, site_llm_config
from pmlm.client.llm.cache import cache_key
from pmlm.client.phase_c import points_for, training_points
from pmlm.client.reward import matcher_for, score_answer
from pmlm.client.rl import LocalRL, Point, RLConfig
from pmlm.client.site_config import SiteConfig
from pmlm.client.sites import load_site
from pmlm.common.assemble.policy import apply_update
from pmlm.common.assemble.render import render
from pmlm.common.atomic import write_atomic
from pmlm.common.metrics import paired_interval
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import SITE_POLICY, SITE_REFINEMENT


@dataclass(frozen=True)
class RefineConfig:
    points_per_round: int = 12  # training points visited per RL round
    prompts_per_point: int = 2  # each judged against the other (client/rl.py)
    candidates: int = 8  # prompts the reward model ranks per point once it screens
    reward_model: str = RLConfig.reward_model  # which (client/reward_model.py)
    calls_every: int = RLConfig.calls_every  # after the warm-up, one point in this many costs LLM calls
    explore_temperature: float = 1.0
    lr: float = 5.0  # bench/rl.py's noise-free local RL step ...
    reward_scale: float = 10.0  # ... on advantages scaled as phase C scales them (common/phase_c.py)
    trains: str = "all"  # nothing is released: every weight may move
    max_rounds: int = 40
    val_points: int = 24  # validation points scored per policy (several per patient where patients are few)
    max_calls: int = 150  # distinct LLM requests in all: training, and both policies on the validation points
    # A site below either threshold keeps the consortium policy without refining. Training: the reward model
    # trusts itself after one round of plain episodes (points_per_round x 2 prompts); with fewer patients than two
    # such rounds, every round revisits the same women and the policy learns their answers, not a prompt.
    # Validation: per-point F1 varies by ~0.2 between points, so the mean of fewer than 10 patients has a standard
    # error (~0.06) as large as the gains refinement finds: a "better" refined policy there is mostly chance.
    min_train_patients: int = 24
    min_val_patients: int = 10
    # Kept when its validation F1 is higher by more than min_gain. keep_level (e.g. 0.8) asks more: the lower end
    # of that paired interval (bootstrap over validation patients) above min_gain. Not the default: on nine kept
    # refinements of five demo runs, validation gains did not predict test gains, and the three that 0.8 would
    # have dropped scored +0.020 on test, about what the six it kept did (+0.028; bench/refinements.py). The 95%
    # interval is recorded always.
    min_gain: float = 0.0
    keep_level: float | None = None
    max_tokens: int = 120  # as phase C and the evaluation ask
    seed: int = 0

    def rl_config(self) -> RLConfig:
        return RLConfig(episodes_per_round=self.points_per_round, prompts_per_point=self.prompts_per_point,
                        explore_temperature=self.explore_temperature, reward_scale=self.reward_scale,
                        candidates=self.candidates, use_reward_model=True, reward_model=self.reward_model,
                        warmup_episodes=self.points_per_round * self.prompts_per_point,
                        calls_every=self.calls_every, trains=self.trains, sampling=self.sampling())

    def round_calls(self, screening: bool) -> int:
        """The most LLM requests one RL round makes: every point visited, or once the reward model screens, one in
        calls_every."""
        points = math.ceil(self.points_per_round / max(self.calls_every, 1)) if screening else self.points_per_round
        return points * self.prompts_per_point

    def sampling(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": 0.0}


@dataclass
class RefineResult:
    site_dir: str
    policy: str  # what the site uses now: SITE_REFINED, CONSORTIUM, or "none" (no consortium policy yet)
    reason: str
    train_patients: int = 0
    val_points: int = 0
    val_patients: int = 0
    rounds: int = 0
    calls: int = 0  # distinct LLM requests the refinement needed (its cost with an empty cache)
    llm_calls: int = 0  # of them, the ones that reached the LLM this time (the rest the site's cache answered)
    validation: dict = field(default_factory=dict)  # "consortium" / "refined": mean f1, reward, points
    changes: dict = field(default_factory=dict)  # refined prompt's most frequent changes from the consortium's
    consortium_sha256: str | None = None  # the consortium policy this decision was about
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def site_records(config: SiteConfig, profile) -> tuple[list[Example], dict]:
    """The site's prediction points and timelines (patient id -> Timeline), read from its own data directory."""
    data, kept = load_site(config.site_id, Path(config.data_dir), profile, keep_timelines=True, progress=False)
    return data.examples, {t.patient_id: t for t in kept}


def held_out_points(assembler: PromptAssembler, examples: list[Example], n: int, seed: int,
                    timelines: Mapping | None = None, split: str = "val") -> list[Point]:
    """Up to n points of the split's patients: every patient's points in a seeded order, taken round-robin (one
    point of each patient before a second of any), so a site with few patients still scores enough points."""
    by_patient: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.split == split and ex.targets:
            by_patient.setdefault(ex.patient_id, []).append(ex)
    rng = random.Random(seed)
    queues = []
    for patient in sorted(by_patient):
        exs = list(by_patient[patient])
        rng.shuffle(exs)
        queues.append(exs)
    rng.shuffle(queues)
    chosen = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop())
    return points_for(assembler, chosen, timelines)


def score_policies(policies: dict, points: list[Point], llm, matcher, sampling: dict, requests: set) -> dict:
    """Mean F1 and reward of each policy's chosen prompt on the points, and each point's F1 ("f1_by_point", in
    the points' order, for paired comparisons); the same prompt is asked once (cache)."""
    out = {}
    for name, policy in policies.items():
        f1s, rewards = [], []
        for p in points:
            messages = render(p.context, policy.best(p.state)).messages
            requests.add(cache_key({"messages": messages, "sampling": sampling}))
            answer = llm.chat(messages, allow_empty=True, **sampling)
            score = score_answer(answer.text, p.example, matcher)
            f1s.append(score.f1)
            rewards.append(score.reward)
        out[name] = {"f1": float(np.mean(f1s)), "reward": float(np.mean(rewards)), "points": len(points),
                     "f1_by_point": [round(float(f), 6) for f in f1s]}
    return out


@contextlib.contextmanager
def one_torch_thread():
    """The policy's tensors are tiny: handing each layer to a second thread cost 50 times its arithmetic on the
    2 shared cores here (1.8 ms against 36 us for one 24x32 layer), and 90% of a refinement's own time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def refine_site_policy(site_dir: Path, llm=None, *, examples: list[Example] | None = None,
                       timelines: Mapping | None = None, config: RefineConfig = RefineConfig(),
                       log=None) -> RefineResult:
    """Refine the site's stored consortium policy on its own records and keep the better of the two (see above).

    llm: the site's LLM client (its response cache at SITE_DIR/llm_cache); None opens it from site.json.
    examples / timelines (patient id -> Timeline): the site's records when the caller has read them already;
    None reads them from the site's data directory. Writes only under SITE_DIR/on_site/."""
    site_dir = Path(site_dir)
    if llm is None:
        site = SiteConfig.load(site_dir)
        with open_llm(site_llm_config(site_dir, site.llm)) as opened:
            return refine_site_policy(site_dir, opened, examples=examples, timelines=timelines, config=config,
                                      log=log)
    with one_torch_thread():
        return _refine(site_dir, llm, examples, timelines, config, log or (lambda message: None))


def _refine(site_dir: Path, llm, examples, timelines, config: RefineConfig, log) -> RefineResult:
    started = time.perf_counter()
    site = SiteConfig.load(site_dir)
    profile = load_profile(site.profile)
    artifacts = SiteArtifacts.load(site_dir, profile)
    result = RefineResult(str(site_dir), CONSORTIUM, "")
    if artifacts.consortium_policy is None or artifacts.model is None:
        result.policy = "none"
        result.reason = "no consortium policy or global recommender at this site yet (phases A and C not run)"
        return _record(site_dir, result, None, started)
    if examples is None:
        examples, timelines = site_records(site, profile)
    assembler = PromptAssembler(artifacts)
    train = training_points(assembler, examples, 10**9, config.seed, timelines)
    val = held_out_points(assembler, examples, config.val_points, config.seed, timelines)
    result.train_patients, result.val_points = len(train), len(val)
    result.val_patients = len({p.example.patient_id for p in val})
    if result.train_patients < config.min_train_patients or result.val_patients < config.min_val_patients:
        result.reason = (f"too few points to refine on: {result.train_patients} training patients (needs "
                         f"{config.min_train_patients}), {result.val_patients} validation patients (needs "
                         f"{config.min_val_patients}); the consortium policy stays")
        return _record(site_dir, result, None, started)

    calls_before = getattr(getattr(llm, "usage", None), "calls", 0)
    consortium = artifacts.consortium_policy
    policy = copy.deepcopy(consortium)
    rl_config = config.rl_config()
    rl = LocalRL(policy, llm, matcher_for(profile.name), train, rl_config, seed=config.seed)
    # Both policies' validation prompts are paid for out of the same budget.
    budget = config.max_calls - 2 * len(val)
    if budget < config.round_calls(False) + config.round_calls(True):
        result.reason = (f"{config.max_calls} LLM requests cannot pay for both policies' validation ({2 * len(val)}), "
                         f"the reward model's warm-up and a first screened round: the consortium policy stays")
        return _record(site_dir, result, None, started)
    while result.rounds < config.max_rounds:
        if rl.llm_calls + config.round_calls(rl.screening) > budget:
            break
        episodes = rl.run_episodes()
        visited = len({e.patient_id for e in episodes})
        apply_update(policy, rl.clipped_sum(episodes), lr=config.lr, scale=visited * config.prompts_per_point)
        result.rounds += 1
        log(f"  round {result.rounds}: {rl.llm_calls} training calls")
    policy.eval()

    scores = score_policies({CONSORTIUM: consortium, "refined": policy}, val, llm, rl.matcher,
                            config.sampling(), rl.requests)
    result.calls = rl.llm_calls
    result.llm_calls = getattr(getattr(llm, "usage", None), "calls", 0) - calls_before
    result.validation = scores
    result.changes = _changes(consortium, policy, val)
    refined_f1s, consortium_f1s = (scores[name].pop("f1_by_point") for name in ("refined", CONSORTIUM))
    patients = [p.example.patient_id for p in val]
    gain = paired_interval(refined_f1s, consortium_f1s, patients)  # per-point scores stay out of the record
    result.validation["refined_minus_consortium"] = gain
    low, high = gain["difference_interval"]
    figures = (f"validation F1 {scores['refined']['f1']:.3f} against the consortium policy's "
               f"{scores[CONSORTIUM]['f1']:.3f} on {len(val)} points of {result.val_patients} patients, difference "
               f"{gain['difference']:+.3f} [{low:+.3f}, {high:+.3f}] (95%)")
    if config.keep_level is None:
        kept = gain["difference"] > config.min_gain
    else:
        low, high = paired_interval(refined_f1s, consortium_f1s, patients, level=config.keep_level)[
            "difference_interval"]
        figures += f", [{low:+.3f}, {high:+.3f}] ({config.keep_level:.0%})"
        kept = low > config.min_gain
    if kept:
        result.policy = SITE_REFINED
        result.reason = figures
    elif gain["difference"] > config.min_gain:
        result.reason = f"{figures}: a gain inside the noise, the consortium policy stays"
    else:
        result.reason = f"{figures}: the refined policy did not score higher, the consortium policy stays"
    return _record(site_dir, result, policy if result.policy == SITE_REFINED else None, started, config)


def _changes(consortium, refined, points: list[Point], top: int = 3) -> dict:
    """What the refined policy picks differently from the consortium's on these points: change -> count."""
    counts = Counter()
    for p in points:
        before, after = asdict(consortium.best(p.state)), asdict(refined.best(p.state))
        counts[", ".join(f"{k}={after[k]}" for k in before if before[k] != after[k]) or "none"] += 1
    return dict(counts.most_common(top))


def _record(site_dir: Path, result: RefineResult, policy, started: float,
            config: RefineConfig | None = None) -> RefineResult:
    """Keep the decision at the site: the refined policy (or none: a refined policy kept earlier goes, so the
    consortium policy is what the site uses) and the decision record with its figures. Nothing is sent."""
    result.seconds = round(time.perf_counter() - started, 1)
    result.consortium_sha256 = policy_file_digest(site_dir)
    if policy is not None:
        meta = {"source": SITE_REFINED, "consortium_sha256": result.consortium_sha256,
                "validation": result.validation, "calls": result.calls, "rounds": result.rounds,
                "config": asdict(config), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save_policy(policy, site_dir, meta, SITE_POLICY)
    else:
        (site_dir / SITE_POLICY).unlink(missing_ok=True)
    write_atomic(site_dir / SITE_REFINEMENT, json.dumps(result.to_json(), indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refine the consortium's prompt policy on this site's own records "
                                                 "(site-only: nothing is sent, no budget is spent)")
    parser.add_argument("site_dir", type=Path)
    for f in fields(RefineConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    config = RefineConfig(**{f.name: getattr(args, f.name) for f in fields(RefineConfig)})
    result = refine_site_policy(args.site_dir, config=config, log=print)
    print(f"{result.policy}: {result.reason} ({result.calls} LLM requests, {result.llm_calls} not in the cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
