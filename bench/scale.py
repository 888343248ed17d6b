"""Consortium scale (#18): phases A, B and C through Flower's in-process runtime for S sites x M patients each.

    python bench/scale.py [--sites 3 10 30 100] [--patients 1000] [--rounds 2] [--noise site distributed]
                          [--phases abc] [--min-sites 30] [--per-site M ...] [--read-jobs 2] [--no-adapt]
                          [--quick] [--keep DIR] [--replay-pool FILE]

For each S, a resampled consortium is written first (`pmlm data synth-consortium`, client/synth_consortium.py:
whole timelines of the bundled sample under fresh ids and shifted dates, per-site care patterns). It is a
RESAMPLED population for scale tests, not new patients. Then the real ServerApp and ClientApp run the phases in
one process (server/in_process.py), in a fresh child process per S and noise setting, so that each run's peak
RSS is its own. Printed per run: the time to write the consortium, to read every site's records, phase A (per
round), phase B, phase C, peak RSS, and the bytes each site sent (Flower's wire encoding of every reply, by
message type), then the exponent of each time against S (least squares on log-log).

Noise settings (each site's own policy, client/site_policy.py): "site" (each release carries the site's full
noise, so a sum of S carries sigma*sqrt(S)) and "distributed" with min_sites = k = min(S, --min-sites) (each site
adds sigma/sqrt(k) and checks SecAgg+'s key exchange for at least k sites and threshold k, so the sum carries
sigma*sqrt(S/k): sigma while S <= --min-sites). SecAgg+'s graph is the coordinator's default (server/secure_sum.py
sharing_graph): complete up to 21 sites, sparse above. What that buys, per S:
  - the peer profiles' Recall@5 on one fixed test set (the test points of the first three sites, the same
    records at every S), with the phase-A model of that run. A relative figure on a resampled population:
    compare the settings and the S, never with the sample's results;
  - phase C's released update: its norm against the norm of its noise alone (public figures only,
    server/phase_c.py signal_to_noise), and the signal-to-noise estimate sqrt(ratio^2 - 1).

Phase C's LLM is bench/replay.py: the first --pool-size prompts are answered by the real embedded LLM and kept
in --replay-pool; every later prompt gets one of those real answers (picked by a hash of the prompt), scored by
the site's own reward code against its own patient. Real answers and real scoring, but not answers to that
prompt, so phase C's figures here are costs and noise, not guidance quality.

Every site's records are read up front, by --read-jobs worker processes side by side (in a deployment each site
reads its own on its own host); the examples come back pickled. After phase A each site adapts the recommender
to its own records (#17), one site after another here; --no-adapt switches that off (the operators'
adapt-recommender=false). --per-site runs the smallest S again at other patients per site and fits time against
them. A --keep folder holding a consortium of the same size is reused (the writer is deterministic).

Memory: the in-process runtime holds the coordinator and all S sites in one process, so its peak RSS is theirs
together and grows with S by design. One site's own phase-A work is measured apart, in a child process that runs
the same app with that site alone (with the coordinator's small share: FedAvg of one model). A site's records do
not depend on S (site_001 is the same file for every S of one seed), so one measurement stands for every S.
--quick: S = 3, 6, 10 x 50 patients, 1 round.
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
    """When each phase-A round began and ended, and phase B began, from the lines the ServerApp logs (as pmlm's
    progress bars do)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.marks: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[ROUND " in message:
            self.marks.append(("round", time.perf_counter()))
        elif "Strategy execution finished" in message:  # the last phase-A round is over
            self.marks.append(("end", time.perf_counter()))
        elif "[PMLM phase B] DP k-means" in message:
            self.marks.append(("phase B", time.perf_counter()))


def reply_bytes(outbox) -> dict[str, list[int]]:
    """Each site's replies, by message type, as Flower encodes them on the wire (protobuf bytes)."""
    from flwr.common.serde import message_to_proto

    sizes: dict[str, list[int]] = defaultdict(list)
    for _, reply in outbox:
        sizes[reply.metadata.message_type].append(message_to_proto(reply).ByteSize())
    return sizes


def _read_one(job: tuple[str, str]) -> tuple[str, list]:
    from pmlm.client.sites import load_site
    from pmlm.common.profiles import load_profile

    name, path = job
    site, _ = load_site(name, Path(path), load_profile("obgyn"), progress=False)
    return name, site.examples


def read_sites(sites: dict[str, Path], profile, jobs: int) -> dict[str, list]:
    """Every site's examples, read by `jobs` worker processes side by side (in a deployment each site reads its own
    records on its own host), then handed to the site handlers of this process (client/phase_a.py)."""
    from pmlm.client.phase_a import keep_site_examples, site_examples

    if jobs <= 1 or len(sites) == 1:
        return {name: site_examples(path, name, profile) for name, path in sites.items()}
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as workers:
        examples = dict(workers.imap(_read_one, [(n, str(p)) for n, p in sorted(sites.items())]))
    for name, path in sites.items():
        keep_site_examples(path, profile, examples[name])
    return examples


def run_consortium(data: Path, rounds: int, phases: str, noise: str, min_sites: int, read_jobs: int, adapt: bool,
                   pool: Path, pool_size: int,
                   phase_c_rate: float) -> dict:
    """Phases `phases` over every site under `data`, in this process, each site with noise setting `noise`;
    what it cost, and what the releases carried."""
    from flwr.common import logger as flwr_logger

    from pmlm import logs
    from pmlm.client.client_app import ADAPT_KEY
    from pmlm.client.client_app import app as client_app
    from pmlm.client.sites import discover_sites
    from pmlm.common.profiles import load_profile
    from pmlm.server.in_process import run_in_process
    from pmlm.server.secure_sum import sharing_graph
    from pmlm.server.server_app import app as server_app
    from replay import REPLAY_MODEL, ReplayLLM

    warnings.filterwarnings("ignore")
    logs.tame_flower()  # Flower's console quiet; its logger still tells RoundClock when rounds begin
    sites = discover_sites(data)
    profile = load_profile("obgyn")
    started = time.perf_counter()
    examples = read_sites(sites, profile, read_jobs)  # read once up front
    loaded = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pmlm-scale-"))
    s = len(sites)
    k = min(s, min_sites) if noise == "distributed" else 1
    shared = {"policy-noise": "distributed", "policy-min-sites": k, "policy-secure-sum-only": True} if k > 1 else {}
    run = {"phases": phases, "num-server-rounds": rounds, "local-epochs": 1, "epsilon": EPSILON,
           "workdir": str(work), "evaluate-each-round": False, "min-nodes": s, "phase-c-rounds": 1,
           "phase-c-rate": phase_c_rate, **({"secure-sum-threshold": k} if shared else {})}
    clock = RoundClock()
    flwr_logger.FLOWER_LOGGER.addHandler(clock)
    with ReplayLLM(pool, pool_size) as llm:
        llm_setting = json.dumps({"base_url": llm.base_url, "model": REPLAY_MODEL, "cache_dir": ""})
        nodes = [{"data-dir": str(path), "site-id": name, "site-dir": str(work / "sites" / name),
                  "policy-epsilon-total": EPSILON, "llm": llm_setting, **shared,
                  **({} if adapt else {ADAPT_KEY: "false"})} for name, path in sorted(sites.items())]
        try:
            grid, _ = run_in_process(server_app, client_app, nodes, run)
        finally:
            flwr_logger.FLOWER_LOGGER.removeHandler(clock)
        asked, real_s = dict(llm.counts), llm.real_s
    finished = time.perf_counter()
    summary = json.loads(next((work / "coordinator").glob("*-phases-bc.json")).read_text()) if "b" in phases else {}
    quality = {}
    if "b" in phases:
        test = [e for name in sorted(examples)[:3] for e in examples[name] if e.split == "test" and e.targets]
        quality = peer_recall(work / "sites" / sorted(sites)[0], test)
    shutil.rmtree(work, ignore_errors=True)  # keys, ledgers and models of a throwaway run
    starts = [t for kind, t in clock.marks if kind == "round"]
    phase_a_end = next((t for kind, t in clock.marks if kind in ("end", "phase B")), finished)
    rounds_s = [b - a for a, b in zip(starts, [*starts[1:], phase_a_end])]
    released = summary.get("phase_c", {}).get("released", [])
    return {"sites": s, "noise": noise, "k": k, "graph": sharing_graph(s, k if k > 1 else None) if s > 1 else (1, 1),
            "load_s": loaded - started, "phase_a_s": phase_a_end - loaded,
            "round_s": rounds_s, "phase_b_s": summary.get("phase_b", {}).get("seconds", 0.0),
            # while the pool fills, phase C waits on the real LLM: left out, so every run times the replay alone
            "phase_c_s": summary.get("phase_c", {}).get("seconds", 0.0) - real_s, "llm_s": real_s,
            "total_s": finished - started - real_s,
            "peak_rss_mb": peak_rss_mb(), "reply_bytes": reply_bytes(grid.outbox), "llm": asked,
            "count_noise_std": summary.get("phase_b", {}).get("count_noise_std"),
            "c_ratio": released[0]["ratio"] if released else None, "c_snr": released[0]["snr"] if released else None,
            **quality}


def peer_recall(site_dir: Path, test: list) -> dict:
    """Recall@5 of the peer profiles a site kept (with the phase-A model it kept) on the points `test`."""
    from pmlm.client.phase_a import load_global_model
    from pmlm.client.phase_b import embed_examples
    from pmlm.client.train import ranking_metrics
    from pmlm.common.peer_profiles import PeerProfiles
    from pmlm.common.site_layout import PEER_PROFILES

    model, encoder, _ = load_global_model(site_dir)
    profiles = PeerProfiles.load(site_dir / PEER_PROFILES)
    scores = np.stack([profiles.peer_rates(e)[0] for e in embed_examples(model, encoder, test)])
    return {"peer_recall5": float(ranking_metrics(scores, test, encoder)["recall@5"]), "test_points": len(test),
            "visible_prototypes": int((~profiles.suppressed).sum()), "prototypes": int(profiles.suppressed.size)}


def child(job: dict) -> dict:
    """This script's --child mode in a fresh process: its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthesize(out: Path, sites: int, patients: int) -> float:
    from pmlm.client.synth_consortium import synthesize_consortium
    from pmlm.common.profiles import load_profile

    if (out / "PROVENANCE.md").exists() and len([d for d in out.iterdir() if d.is_dir()]) == sites:
        return float("nan")  # --keep'ed by an earlier run with the same arguments (the writer is deterministic)
    started = time.perf_counter()
    synthesize_consortium(out, sites, patients, load_profile("obgyn"), seed=SEED, jobs=min(2, os.cpu_count() or 1),
                          progress=True)
    return time.perf_counter() - started


def first_sites(consortium: Path, s: int, folder: Path) -> Path:
    """A consortium of the first `s` sites, as links: a site's records depend only on the seed and its index,
    so they are the sites `synth-consortium --sites s` would write."""
    folder.mkdir(parents=True, exist_ok=True)
    for site in sorted(p for p in consortium.iterdir() if p.is_dir())[:s]:
        if not (folder / site.name).exists():  # a --keep folder may hold them from an earlier run
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
    parser.add_argument("--phases", default="abc", choices=("a", "ab", "abc"))
    parser.add_argument("--noise", nargs="+", default=["site", "distributed"], choices=("site", "distributed"),
                        help="the sites' noise settings to run at each S")
    parser.add_argument("--min-sites", type=int, default=30,
                        help="noise 'distributed': each site shares its noise with k = min(S, this) sites")
    parser.add_argument("--per-site", type=int, nargs="*", default=[],
                        help="also run the smallest S at these patients per site, and fit time against them")
    parser.add_argument("--no-adapt", action="store_true",
                        help="sites skip the on-site adaptation after phase A (their operators' adapt-recommender="
                             "false): site-local work that each host does in parallel in a deployment, one site after "
                             "another here")
    parser.add_argument("--read-jobs", type=int, default=2,
                        help="processes reading the sites' records side by side before the run (default 2)")
    parser.add_argument("--phase-c-rate", type=float, default=0.1, help="phase C's public sampling rate")
    parser.add_argument("--replay-pool", type=Path, default=Path("out/scale/replay_pool.jsonl"),
                        help="real LLM answers phase C replays (bench/replay.py); made on first use, then reused")
    parser.add_argument("--pool-size", type=int, default=24, help="real answers in the pool")
    parser.add_argument("--quick", action="store_true", help="S = 3, 6, 10 x 50 patients, 1 round")
    parser.add_argument("--keep", type=Path, help="write the consortia here (default: a temporary folder, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_consortium(Path(job["data"]), job["rounds"], job["phases"], job["noise"],
                                        job["min_sites"], job["read_jobs"], job["adapt"],
                                        Path(job["pool"]), job["pool_size"], job["phase_c_rate"])))
        return 0
    if args.quick:
        args.sites, args.patients, args.rounds = [3, 6, 10], 50, 1
    if args.min_sites < 2:
        parser.error(f"--min-sites must be at least 2 (a site shares its noise with itself and others), "
                     f"got {args.min_sites}")

    print("RESAMPLED consortia (pmlm data synth-consortium from the bundled sample): not new patients; quality "
          "figures here compare settings, never results. In-process runtime: coordinator and every site in one "
          "process. Phase C replays real LLM answers (bench/replay.py).")
    root = args.keep or Path(tempfile.mkdtemp(prefix="pmlm-scale-data-"))
    largest = root / f"s{max(args.sites)}_m{args.patients}"
    synth_s = synthesize(largest, max(args.sites), args.patients)
    common = {"rounds": args.rounds, "pool": str(args.replay_pool.resolve()), "pool_size": args.pool_size,
              "phase_c_rate": args.phase_c_rate, "min_sites": args.min_sites, "read_jobs": args.read_jobs,
              "adapt": not args.no_adapt}
    rows = []
    for s in sorted(args.sites):
        data = first_sites(largest, s, root / f"first_{s}")
        for noise in args.noise:
            if noise == "distributed" and s < 2:
                continue
            rows.append(child({**common, "data": str(data), "phases": args.phases, "noise": noise}))
            print(f"  S={s}, noise {noise}: done in {rows[-1]['total_s']:.0f} s (LLM: {rows[-1]['llm']})",
                  file=sys.stderr, flush=True)
    one = child({**common, "data": str(largest / "site_001"), "phases": "a", "noise": "site"})
    sweep = []
    for m in args.per_site:  # the smallest S again, at other sizes of site
        consortium = root / f"s{min(args.sites)}_m{m}"
        synthesize(consortium, min(args.sites), m)
        sweep.append({**child({**common, "data": str(consortium), "phases": args.phases, "noise": "site"}),
                      "patients": m})
        print(f"  S={min(args.sites)} x {m} patients: done in {sweep[-1]['total_s']:.0f} s", file=sys.stderr,
              flush=True)
    print(f"\nwrote the consortium ({max(args.sites)} sites x {args.patients} patients) in {synth_s:.1f} s"
          if synth_s == synth_s else f"\nreused the consortium kept in {largest}")
    print("on-site adaptation after phase A: " + ("skipped (--no-adapt)" if args.no_adapt
                                                   else "on (each site in turn)"))
    print_table(rows, args, one)
    if sweep:
        print_sweep([r for r in rows if r["noise"] == "site" and r["sites"] == min(args.sites)][:1] + sweep, args)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def print_sweep(rows: list[dict], args) -> None:
    """Cost against patients per site at one S (each site's own noise)."""
    for r in rows:
        r.setdefault("patients", args.patients)
    rows = sorted(rows, key=lambda r: r["patients"])
    print(f"\ncost against patients per site, S = {rows[0]['sites']}, noise site, phases {args.phases.upper()}:")
    head = ("patients", "read s", "phase A s", "phase B s", "phase C s", "total s", "peak RSS MB")
    print("  ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (r["patients"], f"{r['load_s']:.1f}", f"{r['phase_a_s']:.1f}", f"{r['phase_b_s']:.1f}",
                 f"{r['phase_c_s']:.1f}", f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
        print("  ".join(f"{c:>12}" for c in cells))
    xs = [r["patients"] for r in rows]
    print("exponent against patients per site (least squares on log-log):")
    for label, key in (("read records", "load_s"), ("phase A", "phase_a_s"), ("phase B", "phase_b_s"),
                       ("phase C", "phase_c_s"), ("total", "total_s"), ("peak RSS", "peak_rss_mb")):
        print(f"  {label:<38} {exponent(xs, [r[key] for r in rows]):.2f}")


def print_table(rows: list[dict], args, one: dict) -> None:
    print(f"\n{args.patients} patients per site, {args.rounds} phase-A round(s), phases {args.phases.upper()}, "
          f"epsilon {EPSILON:g} per site; times in seconds, RSS in MB; bytes: each site's replies as Flower "
          "encodes them")
    head = ("S", "noise", "read s", "phase A s", "s/A round", "phase B s", "phase C s", "total s", "peak RSS MB",
            "update bytes", "A round bytes", "B+C bytes/site")
    print("  ".join(f"{h:>12}" for h in head))
    for r in rows:
        sizes = r["reply_bytes"]
        r["update_bytes"] = float(np.mean(sizes.get("train", [0])))  # one site's phase-A update (model weights)
        r["bc_bytes"] = sum(sum(v) for k, v in sizes.items() if k != "train") / r["sites"]  # B, C, model, ledger
        cells = (r["sites"], r["noise"], f"{r['load_s']:.1f}", f"{r['phase_a_s']:.1f}",
                 f"{np.mean(r['round_s']):.1f}" if r["round_s"] else "-", f"{r['phase_b_s']:.1f}",
                 f"{r['phase_c_s']:.1f}", f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['update_bytes']:,.0f}", f"{r['update_bytes'] * r['sites']:,.0f}", f"{r['bc_bytes']:,.0f}")
        print("  ".join(f"{c:>12}" for c in cells))
    largest = [r for r in rows if r["sites"] == rows[-1]["sites"]][0]
    print(f"\nreplies by message type at S = {largest['sites']}, noise {largest['noise']} (count, mean bytes):")
    for kind, sizes in sorted(largest["reply_bytes"].items()):
        print(f"  {kind:<32} {len(sizes):>6}  {np.mean(sizes):>12,.0f}")
    for noise in args.noise:
        mine = [r for r in rows if r["noise"] == noise]
        xs = [r["sites"] for r in mine]
        print(f"\nexponent of cost against S, noise {noise} (least squares on log-log; 1.0 = linear):")
        for label, key in (("read records", "load_s"), ("phase A", "phase_a_s"), ("phase B", "phase_b_s"),
                           ("phase C", "phase_c_s"), ("total", "total_s"),
                           ("peak RSS (all sites in one process)", "peak_rss_mb"),
                           ("bytes each site sends after phase A", "bc_bytes")):
            print(f"  {label:<38} {exponent(xs, [r[key] for r in mine]):.2f}")
        if len(mine) > 1:
            per_site = (mine[-1]["peak_rss_mb"] - mine[0]["peak_rss_mb"]) / (mine[-1]["sites"] - mine[0]["sites"])
            print(f"  in-process RSS per added site: {per_site:.0f} MB (every site's records and examples stay in "
                  "the one process)")
    if "peer_recall5" in rows[0]:
        print(f"\nwhat the releases carry (one run each; Recall@5 on the same {rows[0]['test_points']} test points of "
              "the first three sites at every S, a relative figure on a resampled population):")
        head = ("S", "noise", "k", "SecAgg+ graph", "B count sd", "visible protos", "peer Recall@5", "C |sum|/|noise|",
                "C SNR est.")
        print("  ".join(f"{h:>15}" for h in head))
        for r in sorted(rows, key=lambda r: (r["noise"], r["sites"])):
            degree, threshold = r["graph"]
            graph = "complete" if degree == r["sites"] else f"{degree} neighbours"
            cells = (r["sites"], r["noise"], r["k"], f"{graph}, t {threshold}", f"{r['count_noise_std']:.1f}",
                     f"{r['visible_prototypes']}/{r['prototypes']}", f"{r['peer_recall5']:.3f}",
                     "-" if r["c_ratio"] is None else f"{r['c_ratio']:.2f}",
                     "-" if r["c_snr"] is None else f"{r['c_snr']:.2f}")
            print("  ".join(f"{c:>15}" for c in cells))
    llm = {k: sum(r["llm"][k] for r in rows) for k in rows[0]["llm"]}
    print(f"\nphase C's LLM requests over all runs: {llm['real']} answered by the embedded LLM "
          f"({sum(r['llm_s'] for r in rows):.0f} s, left out of the times above), {llm['exact']} asked again, "
          f"{llm['replayed']} given another prompt's real answer (pool {args.replay_pool})")
    print(f"\none site alone (site_001, {args.patients} patients; its own process, phase A, {args.rounds} round(s)): "
          f"peak RSS {one['peak_rss_mb']:.0f} MB, read {one['load_s']:.1f} s, phase A {one['phase_a_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
