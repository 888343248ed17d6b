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


def run_prototypes(sites, concepts: list[str], dim: int, horizon_days: int, config) -> PeerProfiles:
    """Federated DP k-means then one DP profile release, over any transport.

    `sites` is a sequence of objects with ``kmeans_round(centroids, round)`` and
    ``profile_release(centroids)`` returning objects with ``.values`` (noisy aggregates) — in-process
    PhaseBSite objects, or the Flower-backed proxies of the ServerApp.
    """
    from pmlm.common.peer_profiles import initial_centroids

    centroids = initial_centroids(config.prototypes, dim, config.seed)
    for r in range(config.rounds):
        total = sum(site.kmeans_round(centroids, r).values for site in sites)
        centroids = update_centroids(centroids, total, config.min_count)
    releases = [site.profile_release(centroids) for site in sites]
    total = sum(r.values for r in releases)
    per_site_std = [r.entry["mechanism"]["noise_multiplier"] * r.entry["mechanism"]["l2_sensitivity"]
                    for r in releases]
    noise_std = float(np.sqrt(np.sum(np.square(per_site_std))))
    return build_profiles(centroids, total, noise_std, concepts, horizon_days, config.min_count)
