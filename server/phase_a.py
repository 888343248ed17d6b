"""Phase A on the coordinator: FedAvg of the sites' DP-trained recommender, over the sites still in the run, then
the final global model sent to every site to keep.

A site whose own policy receives phase A without training it (client/site_policy.py, `phase_a_train`) answers each
round without weights: it stays in the run and gets the final model, and the round averages the sites that trained.
A site that fails or goes silent in a round is dropped for the rest of the run and the round averages the others
(server/roster.py); with hospital-level DP every site must stay, since Flower scales that noise to the number
of sites it started with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from pmlm.common.atomic import write_atomic
from pmlm.common.phase_a import (
    PHASE,
    QUERY_STORE,
    RECEIVE_ONLY,
    PhaseAConfig,
    expected_noise_multiplier,
    new_model,
    pack_model,
    unpack_model,
)
from pmlm.common.profiles import load_profile
from pmlm.server.roster import SiteRoster


class NoSiteTrained(RuntimeError):
    pass


def receives_only(reply: Message) -> bool:
    """A site whose own policy receives phase A without training it: its reply has no weights, and counts as an
    answer (it stays in the run) but not in the average."""
    metrics = reply.content.metric_records
    return any(RECEIVE_ONLY in m for m in metrics.values())


class RosterFedAvg(FedAvg):
    """FedAvg over the sites still in the run: asks them without waiting for nodes that are gone, averages the
    models of the sites that answered, and drops the ones that did not (see server/roster.py)."""

    def __init__(self, roster: SiteRoster, evaluate: bool):
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
                         min_train_nodes=roster.min_sites, min_evaluate_nodes=roster.min_sites if evaluate else 0,
                         min_available_nodes=roster.min_sites)
        self.roster = roster
        self.asked: list[int] = []
        self.trained: list[str] = []  # the sites whose updates the last round averaged

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
        trained = [r for r in good if not receives_only(r)]
        self.trained = sorted({self.roster.name(r.metadata.src_node_id) for r in trained})
        if not trained:
            raise NoSiteTrained(f"{PHASE} round {server_round}: every site that answered receives phase A without "
                                f"training it (its policy's phase_a_train is false); there is no model to average")
        return super().aggregate_train(server_round, trained)

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
    # Where each site's noise search starts (the same search a fresh site runs, once here instead of at every site);
    # each site still calibrates on its own ledger, so a wrong estimate costs it time, never budget.
    cfg = dataclasses.replace(cfg, noise_guess=expected_noise_multiplier(cfg))
    config = ConfigRecord(cfg.to_record())
    result = strategy.start(grid=grid, initial_arrays=pack_model(model.state_dict(), cfg), num_rounds=cfg.rounds,
                            timeout=timeout, train_config=config,
                            evaluate_config=ConfigRecord({**cfg.to_record(), "split": "val"}))
    final = result.arrays

    # Every site keeps the released global model next to its own ledger (phase B and prompts use it).
    store = RecordDict({"arrays": final, "config": ConfigRecord({**cfg.to_record(), "server-round": cfg.rounds})})
    stored = roster.ask(grid, QUERY_STORE, store, PHASE, timeout=timeout)
    summary = {
        "run": cfg.run_name, "rounds": cfg.rounds, "sites": len(roster.nodes), "sites_stored": len(stored),
        "sites_trained": (strategy.strategy if hospital_dp else strategy).trained,
        "epsilon_per_site": cfg.phase_a_epsilon if cfg.private else None, "roster": roster.summary(),
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    unpack_model(final, cfg)  # fail loudly here rather than in phase B if the arrays are malformed
    write_atomic(workdir / f"{cfg.run_name}.json", json.dumps(summary, indent=2, default=float))
    context.state["phase-a-result"] = ConfigRecord({"json": json.dumps(summary, default=float)})
