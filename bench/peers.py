"""Phase B benchmark: how well the DP peer profiles rank a test patient's next events.

    python bench/peers.py [--data data/sample] [--workdir DIR] [--epsilons 1 3 8] [--draws 5] [--shared-noise]
                          [--quick]

For every test prediction point of the sample consortium (the test split of client/examples.py, pooled
over the hospitals), the top 5 events of her peer profile against what really happened in the horizon:
Recall@5 and NDCG@5 (common/metrics.py, as bench/recsys.py). Rows: exact kNN over the pooled embeddings
of every training point (non-private upper bound), the peer profile without DP, with DP at each epsilon
(the mean over independent noise draws), global popularity, and gestational timing for reference.

Epsilon is phase B's own epsilon per hospital (patient-level, delta 1e-5), as bench/recsys.py states phase
A's. `pmlm demo --epsilon 3` gives phase B 1.68: phase A's cap is half the budget, and B and C share what
composition leaves (common/privacy/budget.py, composed_caps). Every DP row runs phase B's real site and coordinator code
(PhaseBSite releases charged to a fresh ledger per hospital, run_prototypes) on the embeddings of one
phase-A global model, trained here once through the in-process Flower harness or read from --workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

# bench/ is the script's directory, so on sys.path; importing recsys also sets Flower's environment defaults
from recsys import baseline_scores, federated

from pmlm.client.baselines import GestationalTiming, Popularity
from pmlm.client.phase_b import PEER_SPLITS, PhaseBSite, target_columns
from pmlm.common.phase_b import PhaseBConfig
from pmlm.client.phase_a import load_global_model, site_examples
from pmlm.common.phase_a import PhaseAConfig
from pmlm.client.phase_b import embed_examples
from pmlm.client.sites import discover_sites
from pmlm.client.train import ranking_metrics
from pmlm.common.peer_profiles import normalise
from pmlm.common.privacy import BudgetConfig, SiteLedger
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseSharing
from pmlm.common.profiles import load_profile
from pmlm.server.prototypes import collect_from, run_prototypes

PHASE_B_SHARE = 0.25  # the bench gives phase B exactly eps: a quarter of a budget of 4 eps
DELTA = 1e-5


def phase_a_model(sites: dict[str, Path], args):
    """The phase-A global model whose embeddings phase B clusters: stored in --workdir, or trained here."""
    if args.workdir:
        return load_global_model(Path(args.workdir) / "sites" / sorted(sites)[0])[:2]
    return federated(sites, {"num-server-rounds": args.phase_a_rounds, "local-epochs": 1,
                             "phase-a-epsilon": args.phase_a_epsilon, "delta": DELTA})[:2]


def knn_scores(pool: np.ndarray, pool_targets: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Each query's event rates among its k most similar pooled training points (cosine)."""
    similarity = normalise(queries) @ normalise(pool).T
    nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
    return pool_targets[nearest].mean(axis=1)


def exact_collect(sites: list[PhaseBSite]):
    """`collect` without noise: the sites' exact statistics summed (the no-DP reference; nothing released)."""

    def collect(kind: str, centroids: np.ndarray, round: int, centre: np.ndarray):
        return sum(site.stats(kind, centroids, centre) for site in sites), 0.0

    return collect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "sample")
    parser.add_argument("--workdir", type=Path, help="use the phase-A model stored here (WORKDIR/sites/<site>)")
    parser.add_argument("--phase-a-epsilon", type=float, default=1.5,
                        help="phase A's epsilon per site when training here (1.5: the demo's; 0: non-private)")
    parser.add_argument("--phase-a-rounds", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--draws", type=int, default=5, help="independent noise draws per epsilon")
    parser.add_argument("--prototypes", type=int, default=PhaseBConfig.prototypes)
    parser.add_argument("--rounds", type=int, default=PhaseBConfig.rounds)
    parser.add_argument("--min-count", type=int, default=PhaseBConfig.min_count)
    parser.add_argument("--knn", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise draws (the product draws from OS entropy)")
    parser.add_argument("--shared-noise", action="store_true",
                        help="also run every DP row with the noise shared by all the sites (each site's policy "
                             "noise = \"distributed\", min_sites = the number of sites): the sum carries σ, not σ√S")
    parser.add_argument("--quick", action="store_true", help="CI-sized: one phase-A round, epsilon 3 only, one draw")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.phase_a_rounds, args.epsilons, args.draws = 1, [3.0], 1
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    started = time.time()

    def progress(what: str) -> None:
        print(f"  {what} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    profile = load_profile(PhaseAConfig.profile)
    concepts = [c.id for c in profile.concepts]
    sites = {name: path.resolve() for name, path in discover_sites(args.data).items()}
    by_site = {name: site_examples(path, name, profile) for name, path in sorted(sites.items())}
    progress("records read")
    model, encoder = phase_a_model(sites, args)
    progress("phase-A model ready")
    informing = {name: [e for e in exs if e.split in PEER_SPLITS] for name, exs in by_site.items()}
    embeddings = {name: embed_examples(model, encoder, exs) for name, exs in informing.items()}
    test = [e for exs in by_site.values() for e in exs if e.split == "test" and e.targets]
    test_embeddings = embed_examples(model, encoder, test)
    progress("embedded")

    config = PhaseBConfig(prototypes=args.prototypes, rounds=args.rounds, min_count=args.min_count)
    rows: dict[str, dict] = {}

    def score(scores: np.ndarray, **extra) -> dict:
        metrics = ranking_metrics(scores, test, encoder)
        return {"recall@5": metrics["recall@5"], "ndcg@5": metrics["ndcg@5"], **extra}

    pool = [e for exs in informing.values() for e in exs]
    pool_targets = np.zeros((len(pool), len(concepts)))
    for row, columns in enumerate(target_columns(pool, concepts)):
        pool_targets[row, columns] = 1.0
    pool_embeddings = np.concatenate([embeddings[name] for name in informing])
    rows[f"exact kNN, k={args.knn} (pooled, non-private)"] = score(
        knn_scores(pool_embeddings, pool_targets, test_embeddings, args.knn))

    def phase_b_sites(ledgers: dict[str, SiteLedger | None], draw: int) -> list[PhaseBSite]:
        return [PhaseBSite(ledgers[name], informing[name], embeddings[name], concepts, config, run_id=f"bench-{draw}",
                           rng=np.random.default_rng([args.seed, draw, i]))
                for i, name in enumerate(informing)]

    # Shared: each site adds σ/√S, as with `noise = "distributed"` after a key exchange of every site with threshold S.
    every_site = len(informing)
    settings = [("", SITE_NOISE)]
    if args.shared_noise:
        settings.append((f", noise shared by {every_site}",
                         NoiseSharing(min_sites=every_site, sites=every_site, threshold=every_site)))

    def profile_scores(profiles) -> np.ndarray:
        return np.stack([profiles.peer_rates(e)[0] for e in test_embeddings])

    exact = run_prototypes(exact_collect(phase_b_sites(dict.fromkeys(informing), 0)), concepts,
                           model.cfg.dim, profile.horizon_days, config)
    no_dp = score(profile_scores(exact), visible=int((~exact.suppressed).sum()), noise_std=0.0)
    rows["peer profile, no DP"] = no_dp
    progress("no-DP prototypes")
    for eps in sorted(args.epsilons, reverse=True):
        budget = BudgetConfig(eps / PHASE_B_SHARE, DELTA, {"phase_a": 0.5, "phase_b": PHASE_B_SHARE, "phase_c": 0.25})
        for label, sharing in settings:
            draws = []
            for draw in range(args.draws):
                with tempfile.TemporaryDirectory(prefix="pmlm-bench-peers-") as tmp:
                    ledgers = {name: SiteLedger(Path(tmp) / name, name, budget) for name in informing}
                    profiles = run_prototypes(collect_from(phase_b_sites(ledgers, draw), sharing), concepts,
                                              model.cfg.dim, profile.horizon_days, config)
                    spent = max(ledger.spent(phase="phase_b").pld for ledger in ledgers.values())
                    releases = {len([e for e in ledger.entries() if e.get("kind") == "release"])
                                for ledger in ledgers.values()}
                draws.append(score(profile_scores(profiles), visible=int((~profiles.suppressed).sum()),
                                   noise_std=profiles.count_noise_std, epsilon_spent=spent, releases=max(releases)))
            recalls = [d["recall@5"] for d in draws]
            rows[f"peer profile, DP eps={eps:g}{label}"] = {
                **{key: float(np.mean([d[key] for d in draws])) for key in draws[0]},
                "recall@5_sd": float(np.std(recalls)), "recall@5_draws": recalls}
            progress(f"DP prototypes at eps {eps:g}{label}")
    train = [e for exs in informing.values() for e in exs]
    for name, ranker in (("global popularity", Popularity(train)), ("gestational timing (reference)",
                                                                    GestationalTiming(train))):
        rows[name] = score(baseline_scores(ranker, test, encoder))

    phase_a = (f"stored in {args.workdir}" if args.workdir else
               f"trained here: {args.phase_a_rounds} federated rounds x 1 local epoch, "
               + (f"DP-SGD eps={args.phase_a_epsilon:g} per site" if args.phase_a_epsilon > 0 else "non-private"))
    patients = {n: len({e.patient_id for e in exs}) for n, exs in informing.items()}
    print(f"\nPeer profiles (phase B): {len(test)} test points from {len(sites)} hospitals; peers from "
          f"{sum(len(x) for x in informing.values())} train/val points of "
          f"{', '.join(f'{n} {k}' for n, k in patients.items())} patients")
    print(f"Embeddings: one phase-A global model ({phase_a}), the same for every row")
    print(f"Phase B: {config.prototypes} prototypes, {config.rounds} k-means rounds (round 0: the centre), "
          f"min count {config.min_count}; eps = phase B's own eps per hospital (patient-level, delta {DELTA:g}; "
          f"site total 4x with the default shares); DP rows: mean of {args.draws} noise draws")
    print(f"{'ranking':<44}{'Recall@5':>9}{'(sd)':>7}{'NDCG@5':>8}{'vs noDP':>8}{'visible':>8}"
          f"{'noise sd':>9}{'eps spent':>10}")
    for name, m in rows.items():
        sd = f"{m['recall@5_sd']:.3f}" if "recall@5_sd" in m else ""
        ratio = f"{m['recall@5'] / no_dp['recall@5']:.2f}" if name.startswith("peer profile") else ""
        visible = f"{m['visible']:.0f}/{config.prototypes}" if "visible" in m else ""
        noise = f"{m['noise_std']:.1f}" if "noise_std" in m else ""
        spent = f"{m['epsilon_spent']:.3f}" if "epsilon_spent" in m else ""
        print(f"{name:<44}{m['recall@5']:>9.3f}{sd:>7}{m['ndcg@5']:>8.3f}{ratio:>8}{visible:>8}{noise:>9}{spent:>10}")

    checks = []
    popularity = rows["global popularity"]["recall@5"]
    if 3.0 in args.epsilons:
        dp3 = rows["peer profile, DP eps=3"]["recall@5"]
        checks += [(f"DP eps=3 >= 80% of the no-DP prototypes ({dp3:.3f} vs {0.8 * no_dp['recall@5']:.3f})",
                    dp3 >= 0.8 * no_dp["recall@5"]),
                   (f"DP eps=3 above global popularity ({dp3:.3f} vs {popularity:.3f})", dp3 > popularity)]
    for eps in args.epsilons:
        for label, _ in settings:
            m = rows[f"peer profile, DP eps={eps:g}{label}"]
            checks.append((f"eps={eps:g}{label}: every release charged, phase-B eps spent {m['epsilon_spent']:.3f} "
                           f"<= {eps:g} ({m['releases']:.0f} ledger releases per site)",
                           m["epsilon_spent"] <= eps + 1e-9 and m["releases"] == config.releases))
    print(f"\n({time.time() - started:.0f} s)")
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": dict(checks), "phase_a": phase_a,
                                         "config": asdict(config)},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
