"""The site worker: one long-lived process beside the SuperNode that answers the site's Flower messages.

    python -m pmlm.client.site_worker --site-dir SITE_DIR [--runtime-api HOST:PORT] [--data-dir DIR --site-id ID]
                                      [--follow-parent]

deploy/scripts/start-supernode.sh starts it (SITE_WORKER=1, the default). Flower 1.42's SuperNode starts a fresh
`flwr-clientapp` process for every message, which then imported torch and Opacus and read the site's records
again before a second of training (a deployed phase-A round took 6.8x the in-process one). With a worker
listening, that process only hands the message over (client/worker_link.py) and returns the reply; the worker
keeps torch imported and the site's records read across messages, as the in-process runtime does. It runs the
same app, handlers, mods and site policy, so what leaves the site is the same, written to the same egress log
and ledger. It exits when its parent (the SuperNode, which start-supernode.sh execs right after starting it) is
gone. Without a worker, or with a stale socket, each message's process answers by itself as before.

With --runtime-api (the SuperNode's runtime API; start-supernode.sh passes it) the worker also takes the node's
tasks itself (client/task_taker.py), so most messages start no process at all; Flower's own launcher stays as
the fallback. With --data-dir it reads the site's records ahead, under the default task profile, while it waits
for the first run, so that run's first round does not wait for the reading (a run under another profile reads
its own when it comes), then warms up (one throwaway DP-SGD epoch: see warm_up).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from pathlib import Path

from pmlm.client import client_app
from pmlm.client.task_taker import start_taking
from pmlm.client.worker_link import SiteWorker


def read_ahead(data_dir: Path, site_id: str, log, *, warm_under=None, site_dir: Path | None = None) -> None:
    """Read the site's records into the cache phase A's handlers use (client/phase_a.py site_examples); with
    `warm_under` (the worker's message lock), then warm up under it (with `site_dir`, its privacy caps too)."""
    from pmlm.client.phase_a import site_examples
    from pmlm.common.phase_a import PhaseAConfig
    from pmlm.common.profiles import load_profile

    started = time.monotonic()
    try:
        examples = site_examples(data_dir, site_id, load_profile(PhaseAConfig().profile))
    except Exception as exc:  # the first message that needs them reads them, and says what is wrong
        log(f"reading the records ahead failed ({type(exc).__name__}: {exc}); the first message reads them")
        return
    log(f"read the records ahead of the first run: {len(examples)} examples in {time.monotonic() - started:.1f} s")
    if warm_under is not None:
        with warm_under:
            try:
                warm_up(examples, log, site_dir=site_dir)
            except Exception as exc:  # only a head start is lost
                log(f"warming up failed ({type(exc).__name__}: {exc}); the first run pays its own start")


WARM_UP_PATIENTS = 8


def warm_up(examples, log, site_dir: Path | None = None) -> None:
    """One throwaway DP-SGD epoch on a few of the site's training patients before the first run. In a fresh process
    the first DP-SGD epoch took 0.72 s against 0.07 s for the next (Opacus's hooks, torch's first kernels); ten
    sites sharing two cores paid that in their first round, where the in-process runtime pays it once. The model
    is discarded and nothing is recorded or sent (nothing is released, so there is no ledger entry). The caller
    holds the worker's message lock: training seeds torch's generator, and a message's DP noise must not share it.

    With `site_dir`, also the per-phase caps of the site's own policy (site.json; the node config a message brings
    may change them): every run's policy check needs them, a few PLD builds (0.12 s) that the in-process runtime's
    sites share through accountant.py's cache and each deployed site paid in its first round."""
    import secrets

    from pmlm.client.features import FeatureEncoder, PatientDataset
    from pmlm.client.phase_a import train_settings
    from pmlm.client.train import train_local
    from pmlm.common.phase_a import PhaseAConfig, new_model
    from pmlm.common.profiles import load_profile

    started = time.monotonic()
    cfg = PhaseAConfig()
    profile = load_profile(cfg.profile)
    patients = set(sorted({e.patient_id for e in examples if e.split == "train"})[:WARM_UP_PATIENTS])
    chosen = [e for e in examples if e.split == "train" and e.patient_id in patients]
    if not chosen:
        return
    settings = train_settings(cfg, seed=secrets.randbits(63))
    settings.noise_multiplier = 1.0
    dataset = PatientDataset(chosen, FeatureEncoder(profile, cfg.max_history), cfg.points_per_patient,
                             seed=secrets.randbits(32))
    train_local(new_model(cfg, profile), dataset, settings)
    if site_dir is not None:
        from pmlm.client.site_policy import SitePolicy

        SitePolicy.load(site_dir).phase_caps()
    log(f"warmed up for the first run (a throwaway DP-SGD epoch on {len(patients)} patients, nothing kept or "
        f"sent{', the policy caps' if site_dir is not None else ''}) in {time.monotonic() - started:.1f} s")


def train_with_threads(threads: int, log) -> None:
    """Sites sharing a host split its cores: ten workers on two cores, each with torch's default (all cores), took
    4.4-9 s for a round's training; with one thread each, 3.6-3.7 s (pmlm deploy local, bench/README.md)."""
    import torch

    torch.set_num_threads(threads)
    log(f"training with {threads} torch thread(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmlm.client.site_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--site-dir", type=Path, required=True, help="the SuperNode's site directory")
    parser.add_argument("--follow-parent", action="store_true",
                        help="exit when the parent process (the SuperNode) is gone")
    parser.add_argument("--data-dir", type=Path, help="the site's records, to read ahead of the first run")
    parser.add_argument("--site-id", help="the site's id (with --data-dir; default: the data folder's name)")
    parser.add_argument("--runtime-api", metavar="HOST:PORT",
                        help="the SuperNode's runtime API: take its ClientApp tasks here instead of a process each")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads for training (default: all cores; sites sharing a host should split them)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    parent = os.getppid() if args.follow_parent else None
    worker = SiteWorker(args.site_dir, client_app.app, on_new_run=client_app.forget_runs).listen()
    # What every message's process imported before its first step: once here, and before the read-ahead thread
    # starts (two threads importing opacus's modules at once failed here with Python's import _DeadlockError).
    for heavy in ("torch", "opacus", "pmlm.client.phase_a"):
        importlib.import_module(heavy)
    if args.threads:
        train_with_threads(args.threads, worker.log)
    if args.data_dir:
        threading.Thread(target=read_ahead, args=(args.data_dir, args.site_id or args.data_dir.name, worker.log),
                         kwargs={"warm_under": worker.one_at_a_time, "site_dir": args.site_dir}, name="read-ahead",
                         daemon=True).start()
    if args.runtime_api:
        start_taking(args.runtime_api, worker.handle, log=worker.log)
    worker.serve_forever(parent_pid=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
