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
its own when it comes).
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


def read_ahead(data_dir: Path, site_id: str, log) -> None:
    """Read the site's records into the cache phase A's handlers use (client/phase_a.py site_examples)."""
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


def train_with_threads(threads: int, log) -> None:
    """Sites sharing a host split its cores: with torch's default (all cores each), ten sites' idle threads spun
    on the cores the others, their SuperNodes and the SuperLink needed (pmlm deploy local, bench/README.md)."""
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
    if args.data_dir:
        threading.Thread(target=read_ahead, args=(args.data_dir, args.site_id or args.data_dir.name, worker.log),
                         name="read-ahead", daemon=True).start()
    if args.threads:
        train_with_threads(args.threads, worker.log)
    if args.runtime_api:
        start_taking(args.runtime_api, worker.handle, log=worker.log)
    worker.serve_forever(parent_pid=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
