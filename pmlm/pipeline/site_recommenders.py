"""The recommender each site could use for its own patients, scored per site and pooled on the sites' test splits.

    local_only     trained on the site's records alone, non-private (the caller trains it: its own epochs and seeds)
    federated_dp   the consortium's DP model (phase A), the same at every site
    adapted        the consortium model adapted at the site (client/adapt.py; the consortium model where the
                   site's validation kept it)
    timing         the timing floor (on the profile's clock), fitted on every site's training split (as the pipeline's row)

Every figure (Recall@5, NDCG@5) comes with a 95% bootstrap interval over patients (all of a patient's test
points are drawn together: common/metrics.patient_bootstrap) and its point and patient counts; adapted − local_only
and adapted / local_only come with paired intervals (the same patients drawn for both). Pooled figures pool the
test points of every site (each site's own models score its own points); its patients are drawn across sites.
A site without test points gets nan figures and 0 points, never an error: the table does not assume any number
of sites or any site's size.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from pmlm.client.adapt import read_adaptation, site_recommender
from pmlm.client.baselines import TimingFloor
from pmlm.client.examples import Example
from pmlm.client.phase_a import load_global_model
from pmlm.client.train import point_scores, predict
from pmlm.common.metrics import ndcg_at_k, patient_bootstrap, percentile_interval, recall_at_k

K = 5
MODELS = ("local_only", "federated_dp", "adapted")
PAIRS = (("adapted", "local_only"),)  # (a, b): a − b and a / b with paired intervals


def evaluate_site_recommenders(site_examples: dict[str, list[Example]], site_dirs: dict, local_only: dict,
                               resamples: int = 2000) -> dict:
    """The per-site and pooled table. `local_only`: site -> (model, encoder) trained on that site's records alone."""
    train = [e for exs in site_examples.values() for e in exs if e.split == "train"]
    timing = TimingFloor(train)
    points, patients, adaptation = {}, {}, {}
    for site, exs in site_examples.items():
        test = [e for e in exs if e.split == "test" and e.targets]
        consortium, encoder, _ = load_global_model(site_dirs[site])
        adapted, adapted_encoder, _ = site_recommender(site_dirs[site])
        local, local_encoder = local_only[site]
        points[site] = {
            "local_only": point_scores(predict(local, test, local_encoder), test, local_encoder, K)[:2],
            "federated_dp": point_scores(predict(consortium, test, encoder), test, encoder, K)[:2],
            "adapted": point_scores(predict(adapted, test, adapted_encoder), test, adapted_encoder, K)[:2],
            "timing": ranker_scores(timing, test),
        }
        patients[site] = [f"{site}/{e.patient_id}" for e in test]
        decision = read_adaptation(site_dirs[site]) or {}
        adaptation[site] = {key: decision.get(key) for key in ("choice", "blend", "epochs", "val_points", "reason")}
    return site_table(points, patients, adaptation, resamples=resamples)


def site_table(points: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], patients: dict[str, list[str]],
               adaptation: dict[str, dict] | None = None, resamples: int = 2000) -> dict:
    """{"sites": {site: figures}, "pooled": figures} from each site's per-point (recall, ndcg) of each model and
    the patient of each point (ids unique across sites)."""
    table = {"sites": {}, "pooled": {}}
    for site in points:
        table["sites"][site] = figures(points[site], patients[site], resamples)
        if adaptation and site in adaptation:
            table["sites"][site]["adaptation"] = adaptation[site]
    names = list(next(iter(points.values()))) if points else []
    pooled = {name: tuple(np.concatenate([points[s][name][i] for s in points]) for i in (0, 1)) for name in names}
    table["pooled"] = figures(pooled, [p for s in points for p in patients[s]], resamples)
    return table


def figures(scores: dict[str, tuple[np.ndarray, np.ndarray]], patients: list[str], resamples: int = 2000) -> dict:
    """Each model's mean Recall@K and NDCG@K with its interval, and the paired differences and ratios of PAIRS."""
    names = list(scores)
    metrics = (f"recall@{K}", f"ndcg@{K}")
    columns = np.stack([np.asarray(scores[n][i], dtype=float) for i in (0, 1) for n in names], axis=1) \
        if patients else np.zeros((0, 2 * len(names)))
    replicates = patient_bootstrap(columns, patients, resamples=resamples)
    means = columns.mean(axis=0) if len(columns) else np.full(columns.shape[1], np.nan)
    col = {(metric, n): i * len(names) + j for i, metric in enumerate(metrics) for j, n in enumerate(names)}
    out: dict[str, dict] = {}
    for n in names:
        out[n] = {"points": len(patients), "patients": len(set(patients))}
        for metric in metrics:
            out[n][metric] = float(means[col[metric, n]])
            out[n][f"{metric}_interval"] = percentile_interval(replicates[:, col[metric, n]])
    for a, b in PAIRS:
        if a not in scores or b not in scores:
            continue
        diff, ratio = out.setdefault(f"{a}_minus_{b}", {}), out.setdefault(f"{a}_over_{b}", {})
        for metric in metrics:
            ra, rb = replicates[:, col[metric, a]], replicates[:, col[metric, b]]
            ma, mb = means[col[metric, a]], means[col[metric, b]]
            diff[metric], diff[f"{metric}_interval"] = float(ma - mb), percentile_interval(ra - rb)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio[metric] = float(ma / mb) if mb else float("nan")
                ratio[f"{metric}_interval"] = percentile_interval(ra / rb)
        diff["points"] = ratio["points"] = len(patients)
        diff["patients"] = ratio["patients"] = len(set(patients))
    return out


def ranker_scores(ranker, examples: Iterable[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Per-point Recall@K and NDCG@K of a count-based baseline (client/baselines.py), examples with targets."""
    examples = [e for e in examples if e.targets]
    ranked = [ranker.rank(e, K) for e in examples]
    return (np.asarray([recall_at_k(r, e.targets, K) for r, e in zip(ranked, examples)], dtype=float),
            np.asarray([ndcg_at_k(r, e.targets, K) for r, e in zip(ranked, examples)], dtype=float))
