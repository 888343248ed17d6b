"""Consortium scale (#18): phases A and B through Flower's in-process runtime for S sites x M patients each.

    python bench/scale.py [--sites 3 10 30 100] [--patients 1000] [--rounds 2] [--quick] [--keep DIR]

For each S, a resampled consortium is written first (`pmlm data synth-consortium`, client/synth_consortium.py:
whole timelines of the bundled sample under fresh ids and shifted dates, per-site care patterns). It is a
RESAMPLED population for scale tests, not new patients, so this bench prints cost only, never quality. Then the
real ServerApp and ClientApp run phases "ab" in one process (server/in_process.py), in a fresh child process per
S so that each S's peak RSS is its own. Printed per S: the time to write the consortium, to read every site's
records, phase A (per round), phase B, peak RSS, and the bytes each site sent (Flower's wire encoding of every
reply, by message type), then the exponent of each time against S (least squares on log-log).

Memory: the in-process runtime holds the coordinator and all S sites in one process, so its peak RSS is theirs
together and grows with S by design. One site's own phase-A work is measured apart, in a child process that runs
the same app with that site alone (with the coordinator's small share: FedAvg of one model). A site's records do
not depend on S (site_001 is the same file for every S of one seed), so one measurement stands for every S.
--quick: S = 3, 6, 10 x 50 patients, 1 round (about 5 minutes of CPU; 100 patients took 8 minutes of CPU, 13 of
wall clock on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

for _key, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ.setdefault(_key, _value)

EPSILON = 3.0  # each site's whole budget; phase A takes its default share
SEED = 18


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class RoundClock(logging.Handler):
    """When each phase-A round and phase B began, from the lines the ServerApp logs (as pmlm's progress bars)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.marks: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[ROUND " in message:
            self.marks.append(("round", time.perf_counter()))
        elif "[PMLM phase B] DP k-means" in message:
            self.marks.append(("phase B", time.perf_counter()))


def reply_bytes(outbox) -> dict[str, list[int]]:
    """Each site's replies, by message type, as Flower encodes them on the wire (protobuf bytes)."""
    from flwr.common.serde import message_to_proto

    sizes: dict[str, list[int]] = defaultdict(list)
    for _, reply in outbox:
        sizes[reply.metadata.message_type].append(message_to_proto(reply).ByteSize())
    return sizes


def run_consortium(data: Path, rounds: int, phases: str) -> dict:
    """Phases `phases` over every site under `data`, in this process; what it cost."""
    from flwr.common import logger as flwr_logger

    from pmlm import logs
    from pmlm.client.client_app import app as client_app
    from pmlm.client.phase_a import site_examples
    from pmlm.client.sites import discover_sites
    from pmlm.common.profiles import load_profile
    from pmlm.server.in_process import run_in_process
    from pmlm.server.server_app import app as server_app

    warnings.filterwarnings("ignore")
    logs.tame_flower()  # Flower's console quiet; its logger still tells RoundClock when rounds begin
    sites = discover_sites(data)
    profile = load_profile("obgyn")
    started = time.perf_counter()
    for name, path in sites.items():  # read once up front (cached per process), so rounds time training only
        site_examples(path, name, profile)
    loaded = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pmlm-scale-"))
    nodes = [{"data-dir": str(path), "site-id": name, "site-dir": str(work / "sites" / name),
              "policy-epsilon-total": EPSILON} for name, path in sorted(sites.items())]
    run = {"phases": phases, "num-server-rounds": rounds, "local-epochs": 1, "epsilon": EPSILON,
           "workdir": str(work), "evaluate-each-round": False, "min-nodes": len(nodes)}
    clock = RoundClock()
    flwr_logger.FLOWER_LOGGER.addHandler(clock)
    try:
        grid, _ = run_in_process(server_app, client_app, nodes, run)
    finally:
        flwr_logger.FLOWER_LOGGER.removeHandler(clock)
    finished = time.perf_counter()
    summary = json.loads(next((work / "coordinator").glob("*-phases-bc.json")).read_text()) if "b" in phases else {}
    shutil.rmtree(work, ignore_errors=True)  # keys, ledgers and models of a throwaway run
    phase_b = summary.get("phase_b", {}).get("seconds", 0.0)
    starts = [t for kind, t in clock.marks if kind == "round"]
    phase_a_end = next((t for kind, t in clock.marks if kind == "phase B"), finished)
    rounds_s = [b - a for a, b in zip(starts, [*starts[1:], phase_a_end])]
    return {"sites": len(sites), "load_s": loaded - started, "phase_a_s": phase_a_end - loaded,
            "round_s": rounds_s, "phase_b_s": phase_b, "total_s": finished - started,
            "peak_rss_mb": peak_rss_mb(), "reply_bytes": reply_bytes(grid.outbox)}


def child(args: list[str]) -> dict:
    """This script's --child mode in a fresh process: its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthesize(out: Path, sites: int, patients: int) -> float:
    from pmlm.client.synth_consortium import synthesize_consortium
    from pmlm.common.profiles import load_profile

    started = time.perf_counter()
    synthesize_consortium(out, sites, patients, load_profile("obgyn"), seed=SEED, jobs=min(2, os.cpu_count() or 1),
                          progress=True)
    return time.perf_counter() - started


def first_sites(consortium: Path, s: int, folder: Path) -> Path:
    """A consortium of the first `s` sites, as links: a site's records depend only on the seed and its index,
    so they are the sites `synth-consortium --sites s` would write."""
    folder.mkdir(parents=True, exist_ok=True)
    for site in sorted(p for p in consortium.iterdir() if p.is_dir())[:s]:
        (folder / site.name).symlink_to(site.resolve(), target_is_directory=True)
    return folder


def exponent(xs: list[float], ys: list[float]) -> float:
    """b of y = a * x^b, least squares on log-log."""
    if len(xs) < 2 or min(ys) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30, 100])
    parser.add_argument("--patients", type=int, default=1000, help="per site")
    parser.add_argument("--rounds", type=int, default=2, help="phase-A rounds")
    parser.add_argument("--quick", action="store_true", help="S = 3, 6, 10 x 50 patients, 1 round")
    parser.add_argument("--keep", type=Path, help="write the consortia here (default: a temporary folder, removed)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, data, rounds = args.child
        print(json.dumps(run_consortium(Path(data), int(rounds), "ab" if mode == "consortium" else "a")))
        return 0
    if args.quick:
        args.sites, args.patients, args.rounds = [3, 6, 10], 50, 1

    print("RESAMPLED consortia (pmlm data synth-consortium from the bundled sample): not new patients; this bench "
          "reports cost only. In-process runtime: coordinator and every site in one process.")
    root = args.keep or Path(tempfile.mkdtemp(prefix="pmlm-scale-data-"))
    largest = root / f"s{max(args.sites)}_m{args.patients}"
    synth_s = synthesize(largest, max(args.sites), args.patients)
    rows = []
    for s in sorted(args.sites):
        data = first_sites(largest, s, root / f"first_{s}")
        rows.append(child(["consortium", str(data), str(args.rounds)]))
        print(f"  S={s}: done in {rows[-1]['total_s']:.0f} s", file=sys.stderr)
    one = child(["site", str(largest / "site_001"), str(args.rounds)])
    print(f"\nwrote the consortium ({max(args.sites)} sites x {args.patients} patients) in {synth_s:.1f} s")
    print_table(rows, args, one)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def print_table(rows: list[dict], args, one: dict) -> None:
    print(f"\n{args.patients} patients per site, {args.rounds} phase-A round(s), phases A and B, epsilon {EPSILON:g} "
          f"per site; times in seconds, RSS in MB; bytes: each site's replies as Flower encodes them")
    head = ("S", "read s", "phase A s", "s/A round", "phase B s", "total s", "peak RSS MB", "update bytes",
            "A round bytes", "B bytes/site")
    print("  ".join(f"{h:>13}" for h in head))
    for r in rows:
        sizes = r["reply_bytes"]
        r["update_bytes"] = float(np.mean(sizes.get("train", [0])))  # one site's phase-A update (model weights)
        r["b_bytes"] = sum(sum(v) for k, v in sizes.items() if k != "train") / r["sites"]  # B, model and ledger
        cells = (r["sites"], f"{r['load_s']:.1f}", f"{r['phase_a_s']:.1f}",
                 f"{np.mean(r['round_s']):.1f}" if r["round_s"] else "-", f"{r['phase_b_s']:.1f}",
                 f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['update_bytes']:,.0f}",
                 f"{r['update_bytes'] * r['sites']:,.0f}", f"{r['b_bytes']:,.0f}")
        print("  ".join(f"{c:>13}" for c in cells))
    print("\nreplies by message type at the largest S (count, mean bytes):")
    for kind, sizes in sorted(rows[-1]["reply_bytes"].items()):
        print(f"  {kind:<32} {len(sizes):>6}  {np.mean(sizes):>12,.0f}")
    xs = [r["sites"] for r in rows]
    print("\nexponent of cost against S (least squares on log-log; 1.0 = linear):")
    for label, key in (("read records", "load_s"), ("phase A", "phase_a_s"), ("phase B", "phase_b_s"),
                       ("total", "total_s"), ("peak RSS (all sites in one process)", "peak_rss_mb"),
                       ("bytes each site sends after phase A", "b_bytes")):
        print(f"  {label:<38} {exponent(xs, [r[key] for r in rows]):.2f}")
    if len(rows) > 1:
        per_site = (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (rows[-1]["sites"] - rows[0]["sites"])
        print(f"  in-process RSS per added site: {per_site:.0f} MB (every site's records and examples stay in the "
              "one process)")
    print(f"\none site alone (site_001, {args.patients} patients; its own process, phase A, {args.rounds} round(s)): "
          f"peak RSS {one['peak_rss_mb']:.0f} MB, read {one['load_s']:.1f} s, phase A {one['phase_a_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
