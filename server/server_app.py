"""The coordinator's Flower ServerApp: phase A (FedAvg of the sites' DP-trained recommender, server/phase_a.py),
then phases B (DP peer prototypes, server/phase_b.py) and C (the RL prompt policy, server/phase_c.py) when the run
asks for them, then a countersigned copy of every site's new ledger entries (server/ledger_copy.py).

Run config keys (all optional): num-server-rounds, local-epochs, batch-size, lr (non-private), dp-lr
(DP-SGD), epsilon (each site's whole patient-level budget, all phases), phase-a-epsilon (phase A's share of it;
default half, common/privacy/budget.py PHASE_A_SHARE; 0 asks for a non-private run), delta, sampling-rate (DP-SGD's
public Poisson rate) — what the run asks; each site's own policy (client/site_policy.py) refuses more than it
allows (the older spelling, epsilon-total for the whole budget with epsilon as phase A's share, still reads the
same: common/phase_a.py), patient-clip, points-per-patient, dim, max-history, profile, data-root and workdir
(simulation), evaluate-each-round, min-nodes (hospitals to wait for, and the fewest a run may go on with;
default 2), round-timeout (seconds a round waits for the sites' replies, default 3600), hospital-dp-noise and
hospital-dp-clip (hospital-level DP with Flower's client-side fixed clipping; off unless the noise is > 0),
phases ("a", "ab", "abc"), secure-aggregation, secure-sum-threshold (SecAgg+'s reconstruction threshold for
phases B and C; default a majority of the sites each site shares its secrets with), secure-sum-neighbours (how
many sites that is, itself included: all sites up to 21 by default, 21 above; 0 asks for all), and phase B's and C's keys (common/phase_b.py, common/phase_c.py).

A site that fails or goes silent in a round is dropped for the rest of the run (server/roster.py). The run summary
(WORKDIR/coordinator/RUN.json) names the dropped sites; a run left with too few sites stops with an error that
names them, after writing RUN-failed.json.
"""

from __future__ import annotations

import json
import time
import uuid
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pmlm.common.atomic import write_atomic
from pmlm.common.phase_a import RECORD as PHASE_A_RECORD
from pmlm.common.phase_a import PhaseAConfig
from pmlm.common.phase_b import PhaseBConfig
from pmlm.common.phase_c import PhaseCConfig
from pmlm.common.profiles import load_profile
from pmlm.common.run_config import run_config_of
from pmlm.server.ledger_copy import LEDGER_COPIES_DIR, CoordinatorLedgerCopy, CopyRejected
from pmlm.server.phase_a import run_phase_a
from pmlm.server.phase_b import run_phase_b
from pmlm.server.phase_c import run_phase_c
from pmlm.server.reply_polling import poll_promptly
from pmlm.server.roster import SiteRoster

app = ServerApp()


def phase_a_config(run_config: dict) -> PhaseAConfig:
    cfg = PhaseAConfig.from_run_config(run_config)
    cfg.run_name = f"phase-a-{uuid.uuid4().hex[:12]}"  # names this run in every site's ledger
    return cfg


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = 300.0) -> list[int]:
    """The connected nodes, once at least `minimum` are there (simulation nodes register after main starts)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {minimum} hospitals connected within {timeout_s:.0f} s")
        time.sleep(1.0)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = poll_promptly(grid)  # Flower's deployed grid waits 3 s between asks for replies
    run = run_config_of(context.run_config)
    cfg = phase_a_config(run)
    min_nodes = int(run.get("min-nodes", 2))
    nodes = wait_for_nodes(grid, min_nodes)
    hospital_dp = float(run.get("hospital-dp-noise", 0.0)) > 0
    # Sites are named as the SuperLink knows them (the name each node was registered under), else by node id.
    names = {info.node_id: info.name for info in grid.get_nodes() if info.name and info.node_id in nodes}
    roster = SiteRoster(nodes, min_sites=len(nodes) if hospital_dp else min_nodes, names=names)
    workdir = Path(str(run.get("workdir", "pmlm-work"))) / "coordinator"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run_phase_a(grid, context, run, cfg, roster, workdir, hospital_dp)
        # Phases B (DP peer prototypes) and C (the RL prompt refiner) follow when the run asks for them.
        if "b" in str(run.get("phases", "a")) or "c" in str(run.get("phases", "a")):
            phases = str(run.get("phases"))
            later = run_later_phases(grid, roster, cfg, {**run, "skip-phase-b": "b" not in phases,
                                                         "skip-phase-c": "c" not in phases}, workdir)
            context.state["phases-bc-result"] = ConfigRecord({"json": json.dumps(later, default=float)})
    except Exception as exc:  # too few sites left, a secure sum that failed, ...: say which sites were lost
        failed = {"run": cfg.run_name, "error": f"{type(exc).__name__}: {exc}", "roster": roster.summary()}
        write_atomic(workdir / f"{cfg.run_name}-failed.json", json.dumps(failed, indent=2))
        raise


def run_later_phases(grid: Grid, roster: SiteRoster, cfg: PhaseAConfig, run: dict, workdir: Path) -> dict:
    """Phase B (DP prototypes and peer profiles), then phase C (the RL prompt policy), over the sites still in
    the run (`roster`, which drops the ones that fail); returns a summary that names the dropped sites."""
    summary: dict = {}
    profile = load_profile(cfg.profile)
    records = {PHASE_A_RECORD: ConfigRecord(cfg.to_record())}
    # SecAgg+ needs at least two sites (one site's "sum" would be its own vector).
    secure = bool(run.get("secure-aggregation", True)) and len(roster.active) >= 2
    summary["secure_aggregation"] = secure
    # SecAgg+'s reconstruction threshold (0 or absent: a majority of the sites asked). Sites that share their noise
    # with at least k others (policy noise "distributed") refuse sums whose threshold is below their k.
    threshold = int(run.get("secure-sum-threshold", 0)) or None
    # Sites each site's secrets are shared with (absent: all sites up to 21, then 21; 0: always all).
    neighbours = int(run["secure-sum-neighbours"]) if "secure-sum-neighbours" in run else None
    if int(run.get("phase-b-rounds", 1)) >= 0 and not run.get("skip-phase-b"):
        started = time.perf_counter()
        b = PhaseBConfig.from_run_config(run)
        log(INFO, "[PMLM phase B] DP k-means, %d prototypes, %d rounds, then peer profiles", b.prototypes, b.rounds)
        profiles = run_phase_b(grid, roster, b, cfg.run_name, [c.id for c in profile.concepts], cfg.dim,
                               profile.horizon_days, site_records=records, secure=secure, threshold=threshold,
                               neighbours=neighbours)
        summary["phase_b"] = {"prototypes": b.prototypes, "suppressed": int(profiles.suppressed.sum()),
                              "count_noise_std": profiles.count_noise_std,
                              "seconds": round(time.perf_counter() - started, 1)}
    if not run.get("skip-phase-c"):
        started = time.perf_counter()
        c = PhaseCConfig.from_run_config(run)
        rounds: list = []
        releases: list = []
        log(INFO, "[PMLM phase C] RL prompt policy, %d rounds", c.rounds)

        def on_round(r, metrics, released):
            rounds.append(metrics)
            releases.append(released)
            step = metrics[0].get("step-lr", c.lr) if metrics else c.lr
            log(INFO, "[PMLM phase C] round %s/%d done, step size %.3g%s", r + 1, c.rounds, step,
                f" (lr {c.lr:g} limited by the DP noise)"
                if step < c.lr else "")
        run_phase_c(grid, roster, c, cfg.run_name, cfg.dim, on_round=on_round, site_records=records, secure=secure,
                    threshold=threshold, neighbours=neighbours)
        summary["phase_c"] = {"rounds": c.rounds, "per_round": rounds, "released": releases,
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


def copy_site_ledgers(grid: Grid, roster: SiteRoster, records: dict, workdir: Path, timeout: float = 600.0) -> dict:
    """Fetch the new ledger entries of every site still in the run and keep the coordinator's countersigned copy.

    Each site is asked for its entries from the head the coordinator anchored on: it must send that entry back
    unchanged, then the new ones chained onto it (server/ledger_copy.py). A shipment the coordinator rejects
    raises LedgerCopiesRejected naming the site and why, after the other sites' copies are stored. A dropped
    site's entries are fetched by the next run it takes part in (the copy asks from what it holds)."""
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
