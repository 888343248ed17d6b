"""Phase B over Flower: the coordinator asks every site for noisy per-prototype statistics, adds them up,
moves the prototypes, and sends the finished peer profiles back to every site.

Messages out carry prototypes (public by then) and the plan; messages back carry one (prototypes x
statistics) array per site and the ledger entry that paid for it — nothing per patient.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from pmlm.common.peer_profiles import PeerProfiles
from pmlm.common.phase_b import PHASE, QUERY_RELEASE, QUERY_STORE, VECTOR_TASK, PhaseBConfig, profiles_message
from pmlm.server.prototypes import run_prototypes, summed_noise_std
from pmlm.server.roster import SiteRoster
from pmlm.server.secure_sum import secure_sum_over

def run_phase_b(grid: Grid, roster: SiteRoster, config: PhaseBConfig, run_id: str, concepts: list[str], dim: int,
                horizon_days: int, on_entries=None, site_records: dict | None = None, secure: bool = False,
                timeout: float = 600.0, threshold: int | None = None,
                neighbours: int | None = None) -> PeerProfiles:
    """`roster`: the sites still in the run; one that fails a round is dropped and the round sums the others.
    `site_records`: extra ConfigRecords every message carries (e.g. phase A's config, naming the run).
    `threshold`, `neighbours`: SecAgg+'s sharing graph (server/secure_sum.py sharing_graph).
    `secure`: the sites' noisy statistics are summed under SecAgg+ (the coordinator sees only totals)."""
    site_records = site_records or {}
    plan = {"run_id": run_id, "plan": json.dumps(asdict(config))}

    def collect(kind: str, centroids: np.ndarray, round: int, centre: np.ndarray):
        if secure:
            scalars = {k: v for rec in site_records.values() for k, v in dict(rec).items()}
            width = len(concepts) + 1 if kind == "profile" else dim + 1
            # Counts and sums grow with a site's size: the range must cover its largest cell plus noise.
            result = secure_sum_over(roster, grid, PHASE, round, VECTOR_TASK,
                                     {**scalars, **plan, "kind": kind, "round": round},
                                     shape=(len(centroids), width), arrays={"centroids": centroids, "centre": centre},
                                     timeout=timeout, clipping_range=8192.0, threshold=threshold,
                                     neighbours=neighbours)
            stds = [m["noise_std"] for m in result.metrics.values()]
            return result.total, float(np.sqrt(np.sum(np.square(stds))))
        arrays = ArrayRecord({"centroids": Array(np.ascontiguousarray(centroids)),
                              "centre": Array(np.ascontiguousarray(centre))})
        content = RecordDict({"arrays": arrays,
                              "config": ConfigRecord({**plan, "kind": kind, "round": round}), **site_records})
        replies = roster.ask(grid, QUERY_RELEASE, content, PHASE, round, timeout=timeout)
        total = sum(r.content["arrays"]["values"].numpy() for r in replies)
        entries = [json.loads(str(r.content["config"]["ledger_entry"])) for r in replies]
        if on_entries is not None:
            on_entries(entries)
        return total, summed_noise_std(entries)

    releases = config.rounds + 1  # the k-means rounds (the first finds the centre), then the peer profiles
    done = []

    def collect_and_report(kind: str, centroids: np.ndarray, round: int, centre: np.ndarray):
        out = collect(kind, centroids, round, centre)
        done.append(kind)
        log(INFO, "[PMLM phase B] release %d/%d (%s) done", len(done), releases, kind)
        return out

    profiles = run_prototypes(collect_and_report, concepts, dim, horizon_days, config)
    roster.ask(grid, QUERY_STORE, RecordDict({**profiles_message(profiles, run_id), **site_records}), PHASE,
               timeout=timeout)
    return profiles
