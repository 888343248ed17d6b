"""Phase B at the coordinator: add up the sites' noisy statistics, move the prototypes, build peer profiles.

The coordinator only ever sees sums of noisy (or, under secure aggregation, only the total of) per-site
statistics; it never sees an embedding, a patient or a per-patient count.
"""

from __future__ import annotations

import numpy as np

from pmlm.common.peer_profiles import PeerProfiles, normalise


def split_release(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[statistics | count] columns back into (statistics, counts)."""
    return total[:, :-1], total[:, -1]


def update_centroids(centroids: np.ndarray, total: np.ndarray, min_count: float) -> np.ndarray:
    """Move each prototype to the direction of its noisy sum; keep it where it is if too few patients chose it."""
    sums, counts = split_release(total)
    moved = normalise(sums)
    keep = counts < min_count
    out = np.where(keep[:, None], centroids, moved)
    return normalise(out)


def build_profiles(centroids: np.ndarray, total: np.ndarray, noise_std: float, concepts: list[str],
                   horizon_days: int, min_count: int) -> PeerProfiles:
    """Noisy histograms -> rates per prototype; prototypes under `min_count` patients are suppressed."""
    hist, counts = split_release(total)
    suppressed = counts < min_count
    safe = np.maximum(counts, 1.0)[:, None]
    rates = np.clip(hist / safe, 0.0, 1.0)
    rates[suppressed] = 0.0
    return PeerProfiles(centroids=centroids, counts=np.maximum(counts, 0.0), rates=rates, suppressed=suppressed,
                        count_noise_std=noise_std, concepts=list(concepts), horizon_days=horizon_days,
                        min_count=min_count)


def run_prototypes(collect, concepts: list[str], dim: int, horizon_days: int, config) -> PeerProfiles:
    """Federated DP k-means, then one DP profile release, over any transport.

    ``collect(kind, centroids, round)`` asks every site for its noisy release of ``kind`` ("kmeans" or
    "profile") and returns ``(total, noise_std)``: the sum over sites and the std of the summed noise.
    In-process tests pass PhaseBSite objects through `collect_from`; the ServerApp sends Flower messages.
    """
    from pmlm.common.peer_profiles import initial_centroids

    centroids = initial_centroids(config.prototypes, dim, config.seed)
    for r in range(config.rounds):
        total, _ = collect("kmeans", centroids, r)
        centroids = update_centroids(centroids, total, config.min_count)
    total, noise_std = collect("profile", centroids, config.rounds)
    return build_profiles(centroids, total, noise_std, concepts, horizon_days, config.min_count)


def summed_noise_std(entries: list[dict]) -> float:
    """Std of the sum of independent Gaussian noises described by the sites' ledger entries."""
    return float(np.sqrt(sum((e["mechanism"]["noise_multiplier"] * e["mechanism"]["l2_sensitivity"]) ** 2
                             for e in entries)))


def collect_from(sites):
    """`collect` over in-process PhaseBSite objects (tests, benchmarks)."""

    def collect(kind: str, centroids: np.ndarray, round: int):
        releases = [site.kmeans_round(centroids, round) if kind == "kmeans" else site.profile_release(centroids)
                    for site in sites]
        return sum(r.values for r in releases), summed_noise_std([r.entry for r in releases])

    return collect
