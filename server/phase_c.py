"""Phase C over Flower: the coordinator sends the global prompt policy, sites return noisy clipped
policy-gradient sums, the coordinator applies their total (FedSGD) and finally sends the policy back.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from pmlm.common.assemble.policy import PromptPolicy, apply_update, initial_bias
from pmlm.common.assemble.render import INITIAL
from pmlm.common.phase_c import PHASE, QUERY_ROUND, QUERY_STORE, VECTOR_TASK, PhaseCConfig, policy_arrays
from pmlm.server.roster import SiteRoster
from pmlm.server.secure_sum import secure_sum_over


def run_phase_c(grid: Grid, roster: SiteRoster, config: PhaseCConfig, run_id: str, embedding_dim: int,
                on_round=None, site_records: dict | None = None, secure: bool = False,
                timeout: float = 1800.0, threshold: int | None = None) -> PromptPolicy:
    """`roster`: the sites still in the run; one that fails a round is dropped and the round sums the others.
    `site_records`: extra ConfigRecords every message carries (e.g. phase A's config, naming the run).
    `secure`: the sites' noisy updates are summed under SecAgg+ (the coordinator sees only the total)."""
    site_records = site_records or {}
    torch.manual_seed(config.seed)
    policy = PromptPolicy(embedding_dim)
    initial_bias(policy, INITIAL)  # start at the initial personalised prompt
    plan = ConfigRecord({"run_id": run_id, "plan": json.dumps(asdict(config)), "embedding_dim": embedding_dim})
    for r in range(config.rounds):
        if secure:
            scalars = {k: v for rec in site_records.values() for k, v in dict(rec).items()}
            weights = {k: v.detach().numpy().copy() for k, v in policy.state_dict().items()}
            n = sum(v.size for v in weights.values())
            result = secure_sum_over(roster, grid, PHASE, r, VECTOR_TASK, {**scalars, **dict(plan), "round": r},
                                     shape=(n,), arrays=weights, timeout=timeout, clipping_range=1024.0,
                                     threshold=threshold)
            total, metrics = result.total, list(result.metrics.values())
        else:
            content = RecordDict({"arrays": policy_arrays(policy),
                                  "config": ConfigRecord({**dict(plan), "round": r}), **site_records})
            replies = roster.ask(grid, QUERY_ROUND, content, PHASE, r, timeout=timeout)
            total = sum(m.content["arrays"]["update"].numpy() for m in replies)
            metrics = [dict(m.content["metrics"]) for m in replies]
        # The sites' true episode counts are private: the step is normalised by a public nominal count.
        episodes = float(max(len(metrics), 1) * config.points_per_site * config.prompts_per_point)
        lr = noise_limited_lr(config.lr, episodes, [float(m.get("noise-std", 0.0)) for m in metrics],
                              config.max_step_noise)
        apply_update(policy, total, lr=lr, scale=episodes)
        for m in metrics:
            m["step-lr"] = lr
        if on_round is not None:
            on_round(r, metrics)
    roster.ask(grid, QUERY_STORE, RecordDict({"arrays": policy_arrays(policy), "config": plan, **site_records}),
               PHASE, timeout=timeout)
    return policy


def noise_limited_lr(lr: float, scale: float, noise_stds: list[float], max_step_noise: float) -> float:
    """The largest step size up to `lr` at which the summed noise (the sites' public standard deviations)
    moves each weight by at most `max_step_noise` (one standard deviation): with few episodes a full step
    would be mostly noise and undo the initial prompt. Post-processing of released values only."""
    noise = float(np.linalg.norm(noise_stds))  # independent Gaussian noises add in variance
    return lr if noise == 0 else min(lr, max_step_noise * scale / noise)

