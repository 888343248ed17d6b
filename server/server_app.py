"""The coordinator's Flower ServerApp for phase A: FedAvg of the sites' DP-trained recommender.

Run config keys (all optional): num-server-rounds, local-epochs, batch-size, lr, epsilon (phase A's
epsilon per site; 0 = non-private, for benchmarks), delta, epsilon-total, patient-clip, dim,
layers, profile, data-root and workdir (simulation), evaluate-each-round, min-nodes (hospitals to wait for, default 2), hospital-dp-noise and hospital-dp-clip
(hospital-level DP with Flower's client-side fixed clipping; off unless the noise is > 0).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from pmlm.client.phase_a import PhaseAConfig, new_model, run_config_of
from pmlm.common.profiles import load_profile

app = ServerApp()

RUN_CONFIG_KEYS = {  # run-config key -> PhaseAConfig field
    "num-server-rounds": "rounds", "local-epochs": "local_epochs", "batch-size": "batch_size", "lr": "lr",
    "optimizer": "optimizer", "epsilon": "epsilon", "delta": "delta", "epsilon-total": "epsilon_total",
    "patient-clip": "patient_clip", "points-per-patient": "points_per_patient", "profile": "profile",
    "dim": "dim", "layers": "layers", "max-history": "max_history",
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = run_config_of(context.run_config)
    cfg = phase_a_config(run)
    nodes = wait_for_nodes(grid, int(run.get("min-nodes", 2)))
    model = new_model(cfg, load_profile(cfg.profile))
    evaluate = bool(run.get("evaluate-each-round", True))  # benchmarks evaluate once, at the end
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0, min_train_nodes=len(nodes),
                      min_evaluate_nodes=len(nodes) if evaluate else 0, min_available_nodes=len(nodes))
    if float(run.get("hospital-dp-noise", 0.0)) > 0:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=float(run["hospital-dp-noise"]),
            clipping_norm=float(run.get("hospital-dp-clip", 1.0)), num_sampled_clients=len(nodes))
    config = ConfigRecord(cfg.to_record())
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                            train_config=config, evaluate_config=ConfigRecord({**cfg.to_record(), "split": "val"}))
    final = result.arrays

    # Every site keeps the released global model next to its own ledger (phase B and prompts use it).
    store = RecordDict({"arrays": final, "config": ConfigRecord({**cfg.to_record(), "server-round": cfg.rounds})})
    replies = grid.send_and_receive([Message(content=store, dst_node_id=n, message_type="query.store_model")
                                     for n in nodes])
    failed = [r for r in replies if r.has_error()]
    summary = {
        "run": cfg.run_name, "rounds": cfg.rounds, "sites": len(nodes), "sites_stored": len(nodes) - len(failed),
        "epsilon_per_site": cfg.epsilon if cfg.private else None,
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    workdir = Path(str(run.get("workdir", "pmlm-work"))) / "coordinator"
    workdir.mkdir(parents=True, exist_ok=True)
    final.to_torch_state_dict()  # fail loudly here rather than in phase B if the arrays are malformed
    (workdir / f"{cfg.run_name}.json").write_text(json.dumps(summary, indent=2, default=float))
    context.state["phase-a-result"] = ConfigRecord({"json": json.dumps(summary, default=float)})

    # Phases B (DP peer prototypes) and C (the RL prompt refiner) follow when the run asks for them.
    if "b" in str(run.get("phases", "a")) or "c" in str(run.get("phases", "a")):
        from pmlm.server.later_phases import run_later_phases

        phases = str(run.get("phases"))
        later = run_later_phases(grid, nodes, cfg, {**run, "skip-phase-b": "b" not in phases,
                                                    "skip-phase-c": "c" not in phases}, workdir)
        context.state["phases-bc-result"] = ConfigRecord({"json": json.dumps(later, default=float)})
