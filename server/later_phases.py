"""Phases B and C on the coordinator, run by the ServerApp after phase A has stored its global model."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from pmlm.client.peers import PhaseBConfig
from pmlm.client.phase_a import PhaseAConfig
from pmlm.client.phase_c import PhaseCConfig
from pmlm.common.atomic import write_atomic
from pmlm.common.profiles import load_profile
from pmlm.server.phase_b import run_phase_b
from pmlm.server.phase_c import run_phase_c
from pmlm.server.roster import SiteRoster

PHASE_B_KEYS = {"phase-b-prototypes": "prototypes", "phase-b-rounds": "rounds", "phase-b-min-count": "min_count"}
PHASE_C_KEYS = {"phase-c-rounds": "rounds", "phase-c-points": "points_per_site", "phase-c-rate": "sampling_rate",
                "phase-c-candidates": "candidates", "phase-c-reward-model": "use_reward_model",
                "phase-c-max-tokens": "max_tokens", "phase-c-trains": "trains"}


def _pick(run: dict, keys: dict, cls):
    return cls(**{field: type(getattr(cls(), field))(run[key]) for key, field in keys.items() if key in run})


def run_later_phases(grid: Grid, roster: SiteRoster, cfg: PhaseAConfig, run: dict, workdir: Path) -> dict:
    """Phase B (DP prototypes and peer profiles), then phase C (the RL prompt policy), over the sites still in
    the run (`roster`, which drops the ones that fail); returns a summary that names the dropped sites."""
    summary: dict = {}
    profile = load_profile(cfg.profile)
    records = {"phase_a": ConfigRecord(cfg.to_record())}
    # SecAgg+ needs at least two sites (one site's "sum" would be its own vector).
    secure = bool(run.get("secure-aggregation", True)) and len(roster.active) >= 2
    summary["secure_aggregation"] = secure
    if int(run.get("phase-b-rounds", 1)) >= 0 and not run.get("skip-phase-b"):
        started = time.perf_counter()
        b = _pick(run, PHASE_B_KEYS, PhaseBConfig)
        log(INFO, "[PMLM phase B] DP k-means, %d prototypes, %d rounds, then peer profiles", b.prototypes, b.rounds)
        profiles = run_phase_b(grid, roster, b, cfg.run_name, [c.id for c in profile.concepts], cfg.dim,
                               profile.horizon_days, site_records=records, secure=secure)
        summary["phase_b"] = {"prototypes": b.prototypes, "suppressed": int(profiles.suppressed.sum()),
                              "count_noise_std": profiles.count_noise_std,
                              "seconds": round(time.perf_counter() - started, 1)}
    if not run.get("skip-phase-c"):
        started = time.perf_counter()
        c = _pick(run, PHASE_C_KEYS, PhaseCConfig)
        rounds: list = []
        log(INFO, "[PMLM phase C] RL prompt policy, %d rounds", c.rounds)

        def on_round(r, metrics):
            rounds.append(metrics)
            step = metrics[0].get("step-lr", c.lr) if metrics else c.lr
            log(INFO, "[PMLM phase C] round %s/%d done, step size %.3g%s", r + 1, c.rounds, step,
                f" (lr {c.lr:g} limited by the DP noise)"
                if step < c.lr else "")
        run_phase_c(grid, roster, c, cfg.run_name, cfg.dim, on_round=on_round, site_records=records, secure=secure)
        summary["phase_c"] = {"rounds": c.rounds, "per_round": rounds,
                              "seconds": round(time.perf_counter() - started, 1)}
    try:
        summary["ledger_copies"] = copy_site_ledgers(grid, roster, records, workdir)
    except LedgerCopiesRejected as exc:  # the summary still says what was copied; the run fails
        summary["ledger_copies"] = exc.result
        raise
    finally:
        summary["roster"] = roster.summary()
        out = workdir / f"{cfg.run_name}-phases-bc.json"
        write_atomic(out, json.dumps(summary, indent=2, default=float))
    return summary


class LedgerCopiesRejected(RuntimeError):
    """The coordinator refused to countersign what one or more sites shipped: their external anchor is broken,
    so the run fails rather than going on with a ledger nobody outside the site can vouch for."""

    def __init__(self, rejected: dict[str, str], result: dict):
        self.rejected, self.result = rejected, result
        super().__init__("ledger copy rejected for " + "; ".join(f"site {s!r}: {why}" for s, why in rejected.items()))


LEDGER_COPIES_DIR = "ledger-copies"  # under the coordinator's workdir: its CoordinatorLedgerCopy state dir


def copy_site_ledgers(grid: Grid, roster: SiteRoster, records: dict, workdir: Path, timeout: float = 600.0) -> dict:
    """Fetch the new ledger entries of every site still in the run and keep the coordinator's countersigned copy.

    Each site is asked for its entries from the head the coordinator anchored on: it must send that entry back
    unchanged, then the new ones chained onto it (server/ledger_copy.py). A shipment the coordinator rejects
    raises LedgerCopiesRejected naming the site and why, after the other sites' copies are stored. A dropped
    site's entries are fetched by the next run it takes part in (the copy asks from what it holds)."""
    from flwr.app import Message, RecordDict

    from pmlm.server.ledger_copy import CopyRejected, CoordinatorLedgerCopy

    copies = CoordinatorLedgerCopy(workdir / LEDGER_COPIES_DIR)
    heads = {site: copies.head(site) for site in copies.sites()}
    # `held` is the last seq the site may leave out (ledger_entries sends what follows it): one before the head,
    # so the head itself comes back and proves the site still holds it.
    held = {site: head["seq"] - 1 for site, head in heads.items() if head is not None}
    content = RecordDict({"config": ConfigRecord({"held": json.dumps(held)}), **records})
    result, rejected = {}, {}
    for reply in grid.send_and_receive([Message(content=content, dst_node_id=n, message_type="query.ledger_entries")
                                        for n in roster.active], timeout=timeout):
        if reply.has_error():
            result[f"node-{reply.metadata.src_node_id}"] = f"no entries: {reply.error.reason}"
            continue
        site_id = str(reply.content["config"]["site_id"])
        roster.names[reply.metadata.src_node_id] = site_id
        try:
            accepted = copies.accept_from_head(site_id, json.loads(str(reply.content["config"]["entries"])))
            result[site_id] = len(accepted)
        except (CopyRejected, ValueError) as exc:  # ValueError: entries that are not JSON
            result[site_id] = f"rejected: {exc}"
            rejected[site_id] = str(exc)
    if rejected:
        raise LedgerCopiesRejected(rejected, result)
    return result
