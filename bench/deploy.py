"""The same app across hosts (#18): Flower's Deployment Engine against its in-process runtime, S sites.

    python bench/deploy.py [--sites 10] [--patients 40] [--rounds 2] [--no-tls] [--also-without-worker] [--keep DIR]

Writes a resampled consortium of S sites (client/synth_consortium.py: scale-test records, not new patients),
then runs phase A on it twice with the same run config: `pmlm deploy local` (a SuperLink and S SuperNodes on
loopback, TLS and node authentication on, the app started with `flwr run`), then the in-process runtime
(server/in_process.py, in a child process of bench/scale.py). Prints each phase-A round's wall time under both
and their ratio (target <= 1.2). Deployed round times come from the moment each progress line of the run log
reached `flwr log --stream`, so they are good to about a second.

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--patients", type=int, default=40, help="per site")
    parser.add_argument("--rounds", type=int, default=2, help="phase-A rounds (the first pays the start-up)")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--also-without-worker", action="store_true",
                        help="also deploy without the site worker (a process per message does it all), side by side")
    parser.add_argument("--keep", type=Path, help="keep the consortium and the deployment's workdir here")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="pmlm-bench-deploy-"))
    data = root / f"s{args.sites}_m{args.patients}"
    synthesize(data, args.sites, args.patients)
    print(f"RESAMPLED consortium of {args.sites} sites x {args.patients} patients (scale-test records); phase A, "
          f"{args.rounds} round(s), the same run config under both engines", flush=True)
    deploy = deployed(data, args.sites, args.rounds, args.tls, root / "deploy")
    print(f"  deployed: {deploy['round_s']}", file=sys.stderr, flush=True)
    bare = None
    if args.also_without_worker:
        bare = deployed(data, args.sites, args.rounds, args.tls, root / "deploy-no-worker", worker=False)
        print(f"  deployed without the site worker: {bare['round_s']}", file=sys.stderr, flush=True)
    local = child({"data": str(data), "rounds": args.rounds, "phases": "a", "noise": "site",
                   "pool": str(root / "unused_pool.jsonl"), "pool_size": 0, "phase_c_rate": 0.1,
                   "min_sites": 2, "read_jobs": 1, "adapt": True})
    header = f"{'round':>6}{'deployed s':>12}{'in-process s':>14}{'ratio':>8}"
    print("\n" + header + (f"{'no worker s':>13}{'ratio':>8}" if bare else ""))
    rows = [*zip(deploy["round_s"], local["round_s"], bare["round_s"] if bare else [None] * args.rounds)]
    totals = [float(np.sum(deploy["round_s"])), float(np.sum(local["round_s"])),
              float(np.sum(bare["round_s"])) if bare else None]
    for label, (d, p, b) in [*enumerate(rows, 1), ("all", totals)]:
        print(f"{label:>6}{d:>12.1f}{p:>14.1f}{d / p:>8.2f}" + (f"{b:>13.1f}{b / p:>8.2f}" if b is not None else ""))
    print(f"\ndeployed: {deploy['before_round_1_s']:.1f} s from `flwr run` to round 1, app run {deploy['app_run_s']:.1f} s, "
          f"whole rehearsal {deploy['total_s']:.1f} s (TLS {'on' if args.tls else 'off'}); in-process: reading "
          f"{local['load_s']:.1f} s before round 1 (every site's records, once)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
