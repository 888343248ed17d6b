"""The same app across hosts (#18): Flower's Deployment Engine against its in-process runtime, S sites.

    python bench/deploy.py [--sites 10] [--patients 40] [--rounds 2] [--repeat 1] [--no-tls] [--also-without-worker]
                           [--keep DIR]

Writes a resampled consortium of S sites (client/synth_consortium.py: scale-test records, not new patients),
then runs phase A on it twice with the same run config: `pmlm deploy local` (a SuperLink and S SuperNodes on
loopback, TLS and node authentication on, the app started with `flwr run`), then the in-process runtime
(server/in_process.py, in a child process of bench/scale.py). Prints each phase-A round's wall time under both
and their ratio (target <= 1.2). Deployed round times come from the moment each progress line of the run log
reached `flwr log --stream`, so they are good to about a second. With --repeat N both are run N times, every
other pair in the other order, and the median ratio of each round is printed with its range: on these two cores
one pair's round-1 ratio ranged from 1.10 to 1.87 with the same code.

Why the deployment costs more (Flower 1.42, read in flwr/supernode): a SuperNode with nothing to do sleeps 3 s
before it asks the SuperLink again (start_client_internal.py), the ServerApp's grid sleeps 3 s between asks for
replies, and every message starts a fresh `flwr-clientapp` process that unpacks the app, imports it and reads the
site's records: both isolation modes run one process per message. The kit's answers: the site worker
(client/site_worker.py, on by default) keeps torch imported and the records read, and takes the SuperNode's tasks
itself (client/task_taker.py), so no process starts per message; the SuperNode starts with a 1 s idle poll
(pmlm/deploy/supernode.py) and the coordinator asks for replies after 0.1 s, backing off to 1 s
(server/reply_polling.py). --also-without-worker measures the bare path (a process per message) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from scale import EPSILON, child, synthesize  # bench/ is on sys.path; scale sets Flower's environment defaults

RUN = {"phases": "a", "local-epochs": 1, "epsilon": EPSILON, "evaluate-each-round": False}


def deployed(data: Path, sites: int, rounds: int, tls: bool, workdir: Path, worker: bool = True) -> dict:
    pmlm = Path(sys.executable).with_name("pmlm")
    config = [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
              for k, v in {**RUN, "num-server-rounds": rounds, "min-nodes": sites}.items()]
    command = [str(pmlm), "deploy", "local", "--sites", str(sites), "--data", str(data), "--workdir", str(workdir),
               "--timeout", "3000", *[a for c in config for a in ("--run-config", c)], *([] if tls else ["--no-tls"]),
               *([] if worker else ["--no-site-worker"])]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = json.loads((workdir / "deploy_report.json").read_text())
    if done.returncode != 0 or not report["ok"]:
        failed = [c for c in report["checks"] if not c["ok"]]
        raise RuntimeError(f"pmlm deploy local failed: {failed}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    marks = report["progress_s"]
    starts = [t for t, line in marks if "[ROUND " in line]
    end = next(t for t, line in marks if "Strategy execution finished" in line)
    return {"round_s": [b - a for a, b in zip(starts, [*starts[1:], end])], "app_run_s": report["timings_s"]["app_run"],
            "total_s": report["timings_s"]["total"], "before_round_1_s": starts[0]}


def in_process(root: Path, data: Path, args) -> dict:
    return child({"data": str(data), "rounds": args.rounds, "phases": "a", "noise": "site",
                  "pool": str(root / "unused_pool.jsonl"), "pool_size": 0, "phase_c_rate": 0.1,
                  "min_sites": 2, "read_jobs": 1, "adapt": True})


def print_pair(deploy: dict, local: dict, bare: dict | None, args) -> list[float]:
    """One pair's table; returns its deployed/in-process ratios (each round, then all rounds)."""
    header = f"{'round':>6}{'deployed s':>12}{'in-process s':>14}{'ratio':>8}"
    print("\n" + header + (f"{'no worker s':>13}{'ratio':>8}" if bare else ""))
    rows = [*zip(deploy["round_s"], local["round_s"], bare["round_s"] if bare else [None] * args.rounds)]
    totals = [float(np.sum(deploy["round_s"])), float(np.sum(local["round_s"])),
              float(np.sum(bare["round_s"])) if bare else None]
    for label, (d, p, b) in [*enumerate(rows, 1), ("all", totals)]:
        print(f"{label:>6}{d:>12.1f}{p:>14.1f}{d / p:>8.2f}" + (f"{b:>13.1f}{b / p:>8.2f}" if b is not None else ""))
    print(f"\ndeployed: {deploy['before_round_1_s']:.1f} s from `flwr run` to round 1, app run {deploy['app_run_s']:.1f} s, "
          f"whole rehearsal {deploy['total_s']:.1f} s (TLS {'on' if args.tls else 'off'}); in-process: reading "
          f"{local['load_s']:.1f} s before round 1 (every site's records, once)", flush=True)
    return [d / p for d, p, _ in rows] + [totals[0] / totals[1]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--patients", type=int, default=40, help="per site")
    parser.add_argument("--rounds", type=int, default=2, help="phase-A rounds (the first pays the start-up)")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (median ratios over them)")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--also-without-worker", action="store_true",
                        help="also deploy without the site worker (a process per message does it all), side by side")
    parser.add_argument("--keep", type=Path, help="keep the consortium and the deployment's workdir here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")

    root = args.keep or Path(tempfile.mkdtemp(prefix="pmlm-bench-deploy-"))
    data = root / f"s{args.sites}_m{args.patients}"
    synthesize(data, args.sites, args.patients)
    print(f"RESAMPLED consortium of {args.sites} sites x {args.patients} patients (scale-test records); phase A, "
          f"{args.rounds} round(s), the same run config under both engines", flush=True)
    ratios = []
    for i in range(args.repeat):
        workdir = root / ("deploy" if args.repeat == 1 else f"deploy-{i + 1}")
        shutil.rmtree(workdir, ignore_errors=True)  # a --keep'ed run's deployment is not reused
        if i % 2 == 0:
            deploy, local = deployed(data, args.sites, args.rounds, args.tls, workdir), in_process(root, data, args)
        else:  # the other order, so that a drift of the machine's speed over a pair does not favour one engine
            local, deploy = in_process(root, data, args), deployed(data, args.sites, args.rounds, args.tls, workdir)
        print(f"  deployed: {deploy['round_s']}", file=sys.stderr, flush=True)
        bare = None
        if args.also_without_worker:
            bare = deployed(data, args.sites, args.rounds, args.tls, root / f"deploy-no-worker-{i + 1}", worker=False)
            print(f"  deployed without the site worker: {bare['round_s']}", file=sys.stderr, flush=True)
        if args.repeat > 1:
            print(f"\npair {i + 1} of {args.repeat} ({'deployed' if i % 2 == 0 else 'in-process'} first)")
        ratios.append(print_pair(deploy, local, bare, args))
    if args.repeat > 1:
        table = np.array(ratios)  # pairs x (rounds..., all)
        labels = [*range(1, args.rounds + 1), "all"]
        print(f"\nmedian ratio over {args.repeat} pairs (min-max): " + ", ".join(
            f"{'round ' if label != 'all' else ''}{label} {np.median(col):.2f} ({col.min():.2f}-{col.max():.2f})"
            for label, col in zip(labels, table.T)))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
