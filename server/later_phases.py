"""Phases B and C on the coordinator, run by the ServerApp after phase A has stored its global model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from pmlm.client.peers import PhaseBConfig
from pmlm.client.phase_a import PhaseAConfig
from pmlm.client.phase_c import PhaseCConfig
from pmlm.common.profiles import load_profile
from pmlm.server.phase_b import run_phase_b
from pmlm.server.phase_c import run_phase_c

PHASE_B_KEYS = {"phase-b-prototypes": "prototypes", "phase-b-rounds": "rounds", "phase-b-min-count": "min_count"}
PHASE_C_KEYS = {"phase-c-rounds": "rounds", "phase-c-points": "points_per_site", "phase-c-episodes": "episodes_per_round",
                "phase-c-candidates": "candidates", "phase-c-reward-model": "use_reward_model",
                "phase-c-max-tokens": "max_tokens"}


def _pick(run: dict, keys: dict, cls):
    return cls(**{field: type(getattr(cls(), field))(run[key]) for key, field in keys.items() if key in run})


def run_later_phases(grid: Grid, nodes: list[int], cfg: PhaseAConfig, run: dict, workdir: Path) -> dict:
    """Phase B (DP prototypes and peer profiles), then phase C (the RL prompt policy); returns a summary."""
    summary: dict = {}
    profile = load_profile(cfg.profile)
    records = {"phase_a": ConfigRecord(cfg.to_record())}
    # SecAgg+ needs at least two sites (one site's "sum" would be its own vector).
    secure = bool(run.get("secure-aggregation", True)) and len(nodes) >= 2
    summary["secure_aggregation"] = secure
    if int(run.get("phase-b-rounds", 1)) >= 0 and not run.get("skip-phase-b"):
        started = time.perf_counter()
        b = _pick(run, PHASE_B_KEYS, PhaseBConfig)
        profiles = run_phase_b(grid, nodes, b, cfg.run_name, [c.id for c in profile.concepts], cfg.dim,
                               profile.horizon_days, site_records=records, secure=secure)
        summary["phase_b"] = {"prototypes": b.prototypes, "suppressed": int(profiles.suppressed.sum()),
                              "count_noise_std": profiles.count_noise_std,
                              "seconds": round(time.perf_counter() - started, 1)}
    if not run.get("skip-phase-c"):
        started = time.perf_counter()
        c = _pick(run, PHASE_C_KEYS, PhaseCConfig)
        rounds: list = []
        run_phase_c(grid, nodes, c, cfg.run_name, cfg.dim, on_round=lambda r, m: rounds.append(m),
                    site_records=records, secure=secure)
        summary["phase_c"] = {"rounds": c.rounds, "per_round": rounds,
                              "seconds": round(time.perf_counter() - started, 1)}
    out = workdir / f"{cfg.run_name}-phases-bc.json"
    out.write_text(json.dumps(summary, indent=2, default=float))
    return summary
