"""`pmlm train`: phase A, the federated DP next-event recommender, on a consortium folder.

Each sub-folder of --data is one hospital; each gets WORKDIR/sites/<hospital>/ (ledger, keys, the
released global model, and its site.json with the privacy policy this command sets for it: --epsilon is
the site's whole budget, phase A may spend half) and the coordinator writes WORKDIR/coordinator/. --in-process (default) runs
Flower's ServerApp and ClientApp in this process without Ray; --simulation uses Flower's simulation
engine. The Flower way is `flwr run . --run-config "data-root='data/sample' workdir='pmlm-work'"`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pmlm.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("train", help="phase A: federated, differentially private next-event recommender")
    p.add_argument("--data", type=Path, default=Path("data/sample"), help="consortium folder, one sub-folder per hospital")
    p.add_argument("--workdir", type=Path, default=Path("pmlm-work"), metavar="DIR",
                   help="keeps every site's directory (WORKDIR/sites/SITE), the coordinator's and pmlm.log")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=2, help="DP-SGD epochs at each hospital per round")
    p.add_argument("--epsilon", type=float, default=3.0,
                   help="each hospital's whole patient-level budget, all phases (phase A may spend half)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of each hospital's (ε, δ) guarantee")
    p.add_argument("--non-private", action="store_true", help="no DP-SGD (benchmarks only: weights are not private)")
    p.add_argument("--hospital-dp-noise", type=float, default=0.0,
                   help="add hospital-level DP (Flower client-side fixed clipping) with this noise multiplier")
    p.add_argument("--hospital-dp-clip", type=float, default=1.0,
                   help="with --hospital-dp-noise: the L2 clipping norm of each hospital's update")
    p.add_argument("--profile", default="obgyn", help="task profile (common/profiles/NAME.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in-process", dest="simulation", action="store_false", help="Ray-free, in this process (default)")
    mode.add_argument("--simulation", dest="simulation", action="store_true", help="Flower's simulation engine (Ray)")
    p.set_defaults(handler=cmd_train, simulation=False)


def cmd_train(args) -> int:
    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
        os.environ.setdefault(key, value)
    from pmlm import logs
    from pmlm.client.client_app import app as client_app
    from pmlm.client.sites import discover_sites
    from pmlm.server.server_app import app as server_app

    logs.tame_flower()  # importing the apps imported flwr, which reset its logger

    try:
        sites = discover_sites(args.data)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    if args.epsilon <= 0 and not args.non_private:
        raise CliError("--epsilon must be > 0 (use --non-private for a non-private benchmark run)")
    workdir = args.workdir.resolve()
    log_path = logs.default_log_file(workdir / logs.LOG_FILE_NAME)
    write_site_policies(sites, workdir, args)
    run_config = {
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
        "epsilon": args.epsilon, **({"phase-a-epsilon": 0.0} if args.non_private else {}),
        "delta": args.delta, "profile": args.profile,
        "data-root": str(args.data.resolve()), "workdir": str(workdir),
        "min-nodes": len(sites), "hospital-dp-noise": args.hospital_dp_noise, "hospital-dp-clip": args.hospital_dp_clip,
    }
    before = set((workdir / "coordinator").glob("*.json"))
    if args.simulation:
        from flwr.simulation import run_simulation

        os.environ["PMLM_RUN_CONFIG"] = json.dumps(run_config)  # Ray workers inherit it
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    else:
        from pmlm.server.in_process import run_in_process

        nodes = [{"data-dir": str(path.resolve()), "site-id": name, "site-dir": str(workdir / "sites" / name)}
                 for name, path in sorted(sites.items())]
        run_in_process(server_app, client_app, nodes, run_config)
    written = sorted(set((workdir / "coordinator").glob("*.json")) - before)
    if not written:
        raise CliError(f"the run finished without a coordinator summary; see the log {log_path} "
                       f"(or rerun with --verbose)")
    summary = json.loads(written[-1].read_text())
    last = summary["train_metrics"].get(str(args.rounds), {})
    print(f"phase A run {summary['run']}: {summary['rounds']} rounds, {summary['sites']} hospitals, "
          f"global model stored at {summary['sites_stored']} of them under {workdir / 'sites'}")
    if "epsilon" in last:
        print(f"patient-level epsilon spent in phase A (mean over hospitals): {last['epsilon']:.3f} "
              f"at delta {args.delta:g}; ledgers in {workdir / 'sites'}/*/ledger/")
    return 0


def write_site_policies(sites: dict, workdir: Path, args) -> None:
    """Whoever runs every site of a simulated consortium is each site's operator too: it writes each site.json,
    whose privacy policy the sites enforce (the run config can only ask for less)."""
    from pmlm.client.site_config import SiteConfig

    for name, path in sorted(sites.items()):
        policy = {"epsilon_total": args.epsilon, "delta": args.delta, "allow_non_private": bool(args.non_private)}
        SiteConfig(name, str(path.resolve()), args.profile, privacy=policy).save(workdir / "sites" / name)
