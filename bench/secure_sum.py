"""One SecAgg+ sum against the number of sites, complete graph against the sparse one (#18).

    python bench/secure_sum.py [--sites 10 30 100] [--length 2000] [--graphs complete sparse]

Each S runs the project's secure sum (server/secure_sum.py, Flower's SecAgg+ workflow and client mod) over S
in-process sites that each send a random vector of --length entries (phase C's policy update is about that long),
once with every site sharing its secrets with every other (`neighbours=0`) and once with the default graph
(server/secure_sum.py sharing_graph: complete up to 21 sites, 21 neighbours above). Both settings run in this
one process, side by side, so their ratio is measured on the same machine state. Prints seconds per sum and the
exponent of time against S for each graph (least squares on log-log).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

for _key, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from pmlm.client.secure_sum import attach_secure_sum, register_vector_task  # noqa: E402
from pmlm.server.in_process import RUN_ID, InProcessGrid  # noqa: E402
from pmlm.server.secure_sum import secure_sum, sharing_graph  # noqa: E402
from scale import exponent  # noqa: E402  (bench/ is on sys.path when a bench script runs)

TASK = "bench_random_vector"
app = attach_secure_sum(ClientApp())


def _vector(config: dict, context: Context, arrays: dict) -> np.ndarray:
    return np.random.default_rng(context.node_id).normal(0.0, 10.0, int(config["length"]))


register_vector_task(TASK, _vector)


def one_sum(sites: int, length: int, neighbours: int | None) -> tuple[float, float, int, int]:
    """(seconds, max error against the exact sum, neighbours, threshold) of one secure sum over `sites` sites."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = InProcessGrid(app, [{} for _ in range(sites)], run_config={})
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})
    nodes = sorted(grid.get_node_ids())
    started = time.perf_counter()
    result = secure_sum(grid, context, TASK, {"length": length}, nodes, shape=(length,), timeout=3600,
                        neighbours=neighbours)
    seconds = time.perf_counter() - started
    exact = sum(_vector({"length": length}, grid.contexts[n], {}) for n in nodes)
    if result.sites != nodes:
        raise RuntimeError(f"the sum left out {result.dropped}")
    return seconds, float(np.max(np.abs(result.total - exact))), result.neighbours, result.threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--graphs", nargs="+", default=["complete", "sparse"], choices=("complete", "sparse"))
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    times: dict[str, list[float]] = {g: [] for g in args.graphs}
    print(f"one secure sum of a {args.length}-entry vector, in-process sites, {os.cpu_count()} cores")
    print(f"{'S':>5} {'graph':>9} {'neighbours':>10} {'threshold':>9} {'seconds':>8} {'max error':>10}")
    for s in args.sites:
        for graph in args.graphs:
            seconds, error, d, t = one_sum(s, args.length, 0 if graph == "complete" else None)
            times[graph].append(seconds)
            print(f"{s:>5} {graph:>9} {d:>10} {t:>9} {seconds:>8.1f} {error:>10.2e}", flush=True)
        if len(args.graphs) == 2 and sharing_graph(s)[0] < s:
            print(f"{s:>5} complete / sparse: {times['complete'][-1] / times['sparse'][-1]:.1f}x", flush=True)
    for graph, ys in times.items():
        print(f"time ~ S^{exponent(args.sites, ys):.2f} ({graph} graph)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
