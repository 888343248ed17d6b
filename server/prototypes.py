"""Phase B at the coordinator: add up the sites' noisy statistics, move the prototypes, build peer profiles.

The coordinator only ever sees sums of noisy (or, under secure aggregation, only the total of) per-site
statistics; it never sees an embedding, a patient or a per-patient count.
"""

from __future__ import annotations

import numpy as np

from pmlm.common.peer_profiles import PeerProfiles, initial_centroids, normalise


def split_release(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[statistics | count] columns back into (statistics, counts)."""
    return total[:, :-1], total[:, -1]


def consortium_centre(total: np.ndarray) -> np.ndarray:
    """The mean embedding from the one-prototype round's noisy sum and count, kept inside the unit ball
    (a mean of unit vectors is; the noise may not be)."""
    sums, counts = split_release(total)
    mean = sums[0] / max(float(counts[0]), 1.0)
    return mean / max(1.0, float(np.linalg.norm(mean)))


def update_centroids(centroids: np.ndarray, total: np.ndarray, min_count: float) -> np.ndarray:
    """Move each prototype to the direction of its noisy sum; keep it where it is if too few patients chose it."""
    sums, counts = split_release(total)
    moved = normalise(sums)
    keep = counts < min_count
    out = np.where(keep[:, None], centroids, moved)
    return normalise(out)


def shrunk_rates(hist: np.ndarray, counts: np.ndarray, visible: np.ndarray, noise_std: float) -> np.ndarray:
    """Each prototype's noisy event rates, pulled toward the consortium's rates by `noise_std` pseudo-patients.

    A prototype whose noisy count is no larger than the noise so takes at least half its rates from the
    consortium (whose noise is averaged over every visible prototype), and a well-populated one keeps
    nearly its own; without noise nothing is pulled.
    """
    consortium = np.clip(hist[visible].sum(axis=0), 0.0, None) / max(float(counts[visible].sum()), 1.0)
    rates = (hist + noise_std * consortium) / (np.maximum(counts, 1.0)[:, None] + noise_std)
    return np.clip(rates, 0.0, 1.0)


def build_profiles(centroids: np.ndarray, total: np.ndarray, noise_std: float, concepts: list[str],
                   horizon_days: int, min_count: int, centre: np.ndarray | None = None) -> PeerProfiles:
    """Noisy histograms -> rates per prototype. A prototype is suppressed under `min_count` patients, and
    also while its noisy count is within two noise stds of zero: its profile would be mostly noise."""
    hist, counts = split_release(total)
    suppressed = counts < max(min_count, 2.0 * noise_std)
    rates = shrunk_rates(hist, counts, ~suppressed, noise_std)
    rates[suppressed] = 0.0
    return PeerProfiles(centroids=centroids, counts=np.maximum(counts, 0.0), rates=rates, suppressed=suppressed,
                        count_noise_std=noise_std, concepts=list(concepts), horizon_days=horizon_days,
                        min_count=min_count, centre=centre)


def run_prototypes(collect, concepts: list[str], dim: int, horizon_days: int, config) -> PeerProfiles:
    """Federated DP k-means grown from one prototype, then one DP profile release, over any transport.

    Round 0 fits a single prototype: the consortium's mean embedding, the centre. The later rounds move
    `config.prototypes` directions (drawn from the public seed) around it, on the sphere of centred
    embeddings; the profile release then counts events per prototype.

    ``collect(kind, centroids, round, centre)`` asks every site for its noisy release of ``kind``
    ("centre", "kmeans" or "profile") and returns ``(total, noise_std)``: the sum over sites and the std
    of the summed noise. Tests and benchmarks pass PhaseBSite objects through `collect_from`; the
    ServerApp sends Flower messages.
    """
    centre = np.zeros(dim)
    if config.rounds > 0:
        total, _ = collect("centre", initial_centroids(1, dim, config.seed), 0, centre)
        centre = consortium_centre(total)
    centroids = initial_centroids(config.prototypes, dim, config.seed)
    for r in range(1, config.rounds):
        total, _ = collect("kmeans", centroids, r, centre)
        centroids = update_centroids(centroids, total, config.min_count)
    total, noise_std = collect("profile", centroids, config.rounds, centre)
    return build_profiles(centroids, total, noise_std, concepts, horizon_days, config.min_count, centre)


def summed_noise_std(entries: list[dict]) -> float:
    """Std of the sum of the independent Gaussian noises the sites drew, from their ledger entries. A release whose
    noise is shared (`noise = "distributed"`) states the site's own share: its mechanism's multiplier is the noise
    of the whole sum the site relies on, which would count that noise once per site."""
    def own(e: dict) -> float:
        return e.get("noise", {}).get("site_noise_multiplier", e["mechanism"]["noise_multiplier"])

    return float(np.sqrt(sum((own(e) * e["mechanism"]["l2_sensitivity"]) ** 2 for e in entries)))


def collect_from(sites, noise=None):
    """`collect` over in-process PhaseBSite objects (tests, benchmarks); `noise`: how every site shares its noise
    (a NoiseSharing; None: each site's own full noise)."""
    shared = {} if noise is None else {"noise": noise}

    def collect(kind: str, centroids: np.ndarray, round: int, centre: np.ndarray):
        releases = [site.release(kind, centroids, round, centre, **shared) for site in sites]
        return sum(r.values for r in releases), summed_noise_std([r.entry for r in releases])

    return collect
