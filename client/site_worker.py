"""The site worker: one long-lived process beside the SuperNode that answers the site's Flower messages.

    python -m pmlm.client.site_worker --site-dir SITE_DIR [--runtime-api HOST:PORT] [--follow-parent]

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
the fallback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from pmlm.client import client_app
from pmlm.client.task_taker import start_taking
from pmlm.client.worker_link import SiteWorker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmlm.client.site_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--site-dir", type=Path, required=True, help="the SuperNode's site directory")
    parser.add_argument("--follow-parent", action="store_true",
                        help="exit when the parent process (the SuperNode) is gone")
    parser.add_argument("--runtime-api", metavar="HOST:PORT",
                        help="the SuperNode's runtime API: take its ClientApp tasks here instead of a process each")
    args = parser.parse_args(argv)
    parent = os.getppid() if args.follow_parent else None
    worker = SiteWorker(args.site_dir, client_app.app, on_new_run=client_app.forget_runs).listen()
    for heavy in ("torch", "opacus"):  # what every message's process imported before its first step: once here
        importlib.import_module(heavy)
    if args.runtime_api:
        start_taking(args.runtime_api, worker.handle, log=worker.log)
    worker.serve_forever(parent_pid=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
