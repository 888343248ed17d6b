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

from pmlm.common.assemble.policy import PromptPolicy, apply_update, initial_bias, trained_mask
from pmlm.common.assemble.render import INITIAL
from pmlm.common.phase_c import PHASE, QUERY_ROUND, QUERY_STORE, VECTOR_TASK, PhaseCConfig, policy_arrays
from pmlm.server.roster import SiteRoster
from pmlm.server.secure_sum import secure_sum_over


def run_phase_c(grid: Grid, roster: SiteRoster, config: PhaseCConfig, run_id: str, embedding_dim: int,
                on_round=None, site_records: dict | None = None, secure: bool = False,
                timeout: float = 1800.0, threshold: int | None = None,
                neighbours: int | None = None) -> PromptPolicy:
    """`roster`: the sites still in the run; one that fails a round is dropped and the round sums the others.
    `site_records`: extra ConfigRecords every message carries (e.g. phase A's config, naming the run).
    `threshold`, `neighbours`: SecAgg+'s sharing graph (server/secure_sum.py sharing_graph).
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
                                     threshold=threshold, neighbours=neighbours)
            total, metrics = result.total, list(result.metrics.values())
        else:
            content = RecordDict({"arrays": policy_arrays(policy),
                                  "config": ConfigRecord({**dict(plan), "round": r}), **site_records})
            replies = roster.ask(grid, QUERY_ROUND, content, PHASE, r, timeout=timeout)
            total = sum(m.content["arrays"]["update"].numpy() for m in replies)
            metrics = [dict(m.content["metrics"]) for m in replies]
        # The sites' true episode counts are private: the step is normalised by a public nominal count.
        episodes = float(max(len(metrics), 1) * config.points_per_site * config.prompts_per_point)
        noise_stds = [float(m.get("noise-std", 0.0)) for m in metrics]
        lr = noise_limited_lr(config.lr, episodes, noise_stds, config.max_step_noise)
        released = signal_to_noise(np.asarray(total)[trained_mask(policy, config.trains)], noise_stds)
        apply_update(policy, total, lr=lr, scale=episodes)
        for m in metrics:
            m["step-lr"] = lr
        if on_round is not None:
            on_round(r, metrics, released)
    roster.ask(grid, QUERY_STORE, RecordDict({"arrays": policy_arrays(policy), "config": plan, **site_records}),
               PHASE, timeout=timeout)
    return policy


def signal_to_noise(total: np.ndarray, noise_stds: list[float]) -> dict:
    """How much of a released sum is signal, from public figures only (post-processing): the sum's norm against
    the norm its noise alone would have (the sites' public standard deviations over its trained coordinates).
    A sum of pure noise has ratio about 1; the signal's own norm is estimated as sqrt(|sum|^2 - d sigma^2)."""
    dim = int(total.size)
    noise_norm = float(np.linalg.norm(noise_stds)) * np.sqrt(dim)
    norm = float(np.linalg.norm(total))
    if noise_norm == 0:
        return {"dim": dim, "norm": norm, "noise_norm": 0.0, "ratio": float("inf"), "snr": float("inf")}
    ratio = norm / noise_norm
    return {"dim": dim, "norm": norm, "noise_norm": noise_norm, "ratio": ratio,
            "snr": float(np.sqrt(max(ratio ** 2 - 1.0, 0.0)))}


def noise_limited_lr(lr: float, scale: float, noise_stds: list[float], max_step_noise: float) -> float:
    """The largest step size up to `lr` at which the summed noise (the sites' public standard deviations)
    moves each weight by at most `max_step_noise` (one standard deviation): with few episodes a full step
    would be mostly noise and undo the initial prompt. Post-processing of released values only."""
    noise = float(np.linalg.norm(noise_stds))  # independent Gaussian noises add in variance
    return lr if noise == 0 else min(lr, max_step_noise * scale / noise)

