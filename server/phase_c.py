"""Phase C over Flower: the coordinator sends the global prompt policy, sites return noisy clipped
policy-gradient sums, the coordinator applies their total (FedSGD) and finally sends the policy back.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from pmlm.client.phase_c import PhaseCConfig
from pmlm.client.rl import apply_update, noise_limited_lr
from pmlm.common.policy import PromptPolicy, initial_bias
from pmlm.common.prompt import INITIAL
from pmlm.server.roster import SiteRoster
from pmlm.server.secure_sum import secure_sum_over

PHASE = "phase_c"
QUERY_ROUND = "query.phase_c_round"
QUERY_STORE = "query.phase_c_store"


def policy_arrays(policy: PromptPolicy) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in policy.state_dict().items()})


def policy_from(record: ArrayRecord, embedding_dim: int) -> PromptPolicy:
    return policy_from_numpy({k: record[k].numpy() for k in record.keys()}, embedding_dim)


def policy_from_numpy(arrays: dict, embedding_dim: int) -> PromptPolicy:
    policy = PromptPolicy(embedding_dim)
    policy.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    return policy


def run_phase_c(grid: Grid, roster: SiteRoster, config: PhaseCConfig, run_id: str, embedding_dim: int,
                on_round=None, site_records: dict | None = None, secure: bool = False,
                timeout: float = 1800.0) -> PromptPolicy:
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
            result = secure_sum_over(roster, grid, PHASE, r, "phase_c_round", {**scalars, **dict(plan), "round": r},
                                     shape=(n,), arrays=weights, timeout=timeout, clipping_range=1024.0)
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
