"""The coordinator's Flower ServerApp for phase A: FedAvg of the sites' DP-trained recommender.

Run config keys (all optional): num-server-rounds, local-epochs, batch-size, lr (non-private), dp-lr
(DP-SGD), epsilon (the phase-A epsilon asked of each site; 0 asks for a non-private run), delta, epsilon-total
(the whole budget asked), sampling-rate (DP-SGD's public Poisson rate) — what the run asks; each site's own policy
(client/site_policy.py) refuses more than it allows,
patient-clip, points-per-patient, dim, max-history, profile, data-root and workdir (simulation), evaluate-each-round, min-nodes (hospitals to wait for, and the
fewest a run may go on with; default 2), round-timeout (seconds a round waits for the sites' replies, default 3600),
hospital-dp-noise and hospital-dp-clip (hospital-level DP with Flower's client-side fixed clipping; off unless the
noise is > 0).

A site that fails or goes silent in a round is dropped for the rest of the run and the round averages the others
(server/roster.py); with hospital-level DP every site must stay, since Flower scales that noise to the number
of sites it started with. The run summary (WORKDIR/coordinator/RUN.json) names the dropped sites; a run left
with too few sites stops with an error that names them, after writing RUN-failed.json.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from pmlm.client.phase_a import PHASE, PhaseAConfig, new_model, run_config_of
from pmlm.common.atomic import write_atomic
from pmlm.common.profiles import load_profile
from pmlm.server.roster import SiteRoster

app = ServerApp()

RUN_CONFIG_KEYS = {  # run-config key -> PhaseAConfig field
    "num-server-rounds": "rounds", "local-epochs": "local_epochs", "batch-size": "batch_size", "lr": "lr",
    "dp-lr": "dp_lr", "optimizer": "optimizer", "epsilon": "epsilon", "delta": "delta", "epsilon-total": "epsilon_total",
    "sampling-rate": "sampling_rate",
    "patient-clip": "patient_clip", "points-per-patient": "points_per_patient", "profile": "profile",
    "dim": "dim", "max-history": "max_history",
}


def phase_a_config(run_config: dict) -> PhaseAConfig:
    given = {field: run_config[key] for key, field in RUN_CONFIG_KEYS.items() if key in run_config}
    cfg = PhaseAConfig.from_record(given)
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


class RosterFedAvg(FedAvg):
    """FedAvg over the sites still in the run: asks them without waiting for nodes that are gone, averages the
    models of the sites that answered, and drops the ones that did not (see server/roster.py)."""

    def __init__(self, roster: SiteRoster, evaluate: bool):
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
                         min_train_nodes=roster.min_sites, min_evaluate_nodes=roster.min_sites if evaluate else 0,
                         min_available_nodes=roster.min_sites)
        self.roster = roster
        self.asked: list[int] = []

    def _ask(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str) -> list[Message]:
        self.roster.require(PHASE, server_round)
        config["server-round"] = server_round
        self.asked = self.roster.active
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(content, self.asked, message_type))

    def configure_train(self, server_round, arrays, config, grid):
        return self._ask(server_round, arrays, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round, arrays, config, grid):
        if not self.fraction_evaluate:
            self.asked = []  # nobody asked, nobody to drop
            return []
        return self._ask(server_round, arrays, config, MessageType.EVALUATE)

    def aggregate_train(self, server_round, replies):
        good = self.roster.settle(self.asked, replies, PHASE, server_round)
        self.roster.require(PHASE, server_round)
        return super().aggregate_train(server_round, good)

    def aggregate_evaluate(self, server_round, replies):
        good = self.roster.settle(self.asked, replies, f"{PHASE} evaluation", server_round)
        self.roster.require(f"{PHASE} evaluation", server_round)
        return super().aggregate_evaluate(server_round, good)


class HospitalDpOverRoster(DifferentialPrivacyClientSideFixedClipping):
    """Flower's hospital-level DP around RosterFedAvg. It sees the replies first and skips a round with an error
    reply; settling them here lets the roster stop the run instead (it requires every site, see main)."""

    def aggregate_train(self, server_round, replies):
        good = self.strategy.roster.settle(self.strategy.asked, replies, PHASE, server_round)
        self.strategy.roster.require(PHASE, server_round)
        return super().aggregate_train(server_round, good)


@app.main()
def main(grid: Grid, context: Context) -> None:
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
            from pmlm.server.later_phases import run_later_phases

            phases = str(run.get("phases"))
            later = run_later_phases(grid, roster, cfg, {**run, "skip-phase-b": "b" not in phases,
                                                         "skip-phase-c": "c" not in phases}, workdir)
            context.state["phases-bc-result"] = ConfigRecord({"json": json.dumps(later, default=float)})
    except Exception as exc:  # too few sites left, a secure sum that failed, ...: say which sites were lost
        failed = {"run": cfg.run_name, "error": f"{type(exc).__name__}: {exc}", "roster": roster.summary()}
        write_atomic(workdir / f"{cfg.run_name}-failed.json", json.dumps(failed, indent=2))
        raise


def run_phase_a(grid: Grid, context: Context, run: dict, cfg: PhaseAConfig, roster: SiteRoster, workdir: Path,
                hospital_dp: bool) -> None:
    model = new_model(cfg, load_profile(cfg.profile))
    # Off by default: exact metrics are a query on a site's records, which sites answer only if their policy says so.
    evaluate = bool(run.get("evaluate-each-round", False))
    timeout = float(run.get("round-timeout", 3600))
    strategy = RosterFedAvg(roster, evaluate)
    if hospital_dp:
        strategy = HospitalDpOverRoster(strategy, noise_multiplier=float(run["hospital-dp-noise"]),
                                        clipping_norm=float(run.get("hospital-dp-clip", 1.0)),
                                        num_sampled_clients=len(roster.nodes))
    config = ConfigRecord(cfg.to_record())
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                            timeout=timeout, train_config=config,
                            evaluate_config=ConfigRecord({**cfg.to_record(), "split": "val"}))
    final = result.arrays

    # Every site keeps the released global model next to its own ledger (phase B and prompts use it).
    store = RecordDict({"arrays": final, "config": ConfigRecord({**cfg.to_record(), "server-round": cfg.rounds})})
    stored = roster.ask(grid, "query.store_model", store, PHASE, timeout=timeout)
    summary = {
        "run": cfg.run_name, "rounds": cfg.rounds, "sites": len(roster.nodes), "sites_stored": len(stored),
        "epsilon_per_site": cfg.epsilon if cfg.private else None, "roster": roster.summary(),
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    final.to_torch_state_dict()  # fail loudly here rather than in phase B if the arrays are malformed
    write_atomic(workdir / f"{cfg.run_name}.json", json.dumps(summary, indent=2, default=float))
    context.state["phase-a-result"] = ConfigRecord({"json": json.dumps(summary, default=float)})
