"""Phase B at a site: clipped per-prototype statistics of local patients, released with Gaussian noise.

Each patient counts once per release: one prediction point per patient (chosen by a seeded draw),
her embedding clipped to norm <= 1 (embeddings are unit vectors already) and at most `max_targets`
of her next-horizon events. So one patient changes one prototype's sum by <= 1 in L2 and its count by
1, and her histogram row by at most sqrt(max_targets): the sensitivities below follow from that.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from pmlm.client.examples import Example
from pmlm.common.peer_profiles import normalise
from pmlm.common.privacy import GaussianRelease, SiteLedger
from pmlm.common.privacy.kept import release_once, request_digest

PHASE = "phase_b"
NOISE_SOURCE = "numpy PCG64 seeded from OS entropy (not a cryptographic RNG)"


def one_example_per_patient(examples: list[Example], seed: int, splits=("train", "val")) -> list[Example]:
    """A seeded choice of one prediction point per patient, from the splits allowed to inform peers."""
    by_patient: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.split in splits:
            by_patient.setdefault(ex.patient_id, []).append(ex)
    rng = random.Random(seed)
    return [rng.choice(by_patient[pid]) for pid in sorted(by_patient)]


def kmeans_sensitivity() -> float:
    return math.sqrt(1.0 + 1.0)  # unit-norm embedding into one sum + 1 into one count


def profile_sensitivity(max_targets: int) -> float:
    return math.sqrt(max_targets + 1.0)  # <= max_targets ones in one histogram row + 1 into one count


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(normalise(embeddings) @ centroids.T, axis=1) if len(embeddings) else np.zeros(0, int)


def kmeans_stats(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (pre-noise) per-prototype sums of clipped embeddings and counts; never leaves the site."""
    k, d = centroids.shape
    clipped = normalise(embeddings) if len(embeddings) else np.zeros((0, d))
    labels = assign(clipped, centroids)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, clipped)
    counts = np.bincount(labels, minlength=k).astype(float)
    return sums, counts


def target_matrix(examples: list[Example], concepts: list[str], max_targets: int, seed: int) -> np.ndarray:
    """0/1 rows of next-horizon events, at most `max_targets` ones per patient (a seeded subset if more)."""
    column = {c: i for i, c in enumerate(concepts)}
    rng = random.Random(seed)
    out = np.zeros((len(examples), len(concepts)))
    for row, ex in enumerate(examples):
        targets = [c for c in ex.targets if c in column]
        if len(targets) > max_targets:
            targets = rng.sample(targets, max_targets)
        out[row, [column[c] for c in targets]] = 1.0
    return out


def profile_stats(embeddings: np.ndarray, targets: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = centroids.shape[0]
    labels = assign(embeddings, centroids)
    hist = np.zeros((k, targets.shape[1]))
    np.add.at(hist, labels, targets)
    counts = np.bincount(labels, minlength=k).astype(float)
    return hist, counts


@dataclass
class NoisyRelease:
    """What a site sends in phase B: noisy aggregates only, plus the ledger entry that paid for them."""

    values: np.ndarray  # stacked [per-prototype statistics | counts]
    entry: dict


def release(ledger: SiteLedger, stats: tuple[np.ndarray, np.ndarray], mechanism: GaussianRelease,
            rng: np.random.Generator, *, round: int, run_id: str, what: str, centroids: np.ndarray) -> NoisyRelease:
    """Check the budget, then draw the noise, then record: a refused release draws nothing.
    The same round asked for again with the same `centroids` (a retried secure sum) gets the same release."""
    exact = np.concatenate([stats[0], stats[1][:, None]], axis=1)

    def draw() -> np.ndarray:
        return exact + rng.normal(0.0, mechanism.noise_stddev, size=exact.shape)

    noisy, entry = release_once(ledger, PHASE, mechanism, draw, round=round, run_id=run_id,
                                request=request_digest(centroids), extra={"release": what}, noise_source=NOISE_SOURCE)
    return NoisyRelease(noisy, entry)


@dataclass(frozen=True)
class PhaseBConfig:
    prototypes: int = 8
    rounds: int = 3  # k-means rounds; the peer profile is one more release
    min_count: int = 20  # prototypes with fewer (noisy) patients are suppressed
    max_targets: int = 12  # per-patient cap on histogram contributions
    seed: int = 0  # public: initial prototypes and the per-patient draw depend only on it

    @property
    def releases(self) -> int:
        return self.rounds + 1


class PhaseBSite:
    """A site's side of phase B: its patients' embeddings stay here; only noisy aggregates go out."""

    def __init__(self, ledger: SiteLedger, examples: list[Example], embeddings: np.ndarray, concepts: list[str],
                 config: PhaseBConfig, run_id: str, rng: np.random.Generator | None = None):
        if len(examples) != len(embeddings):
            raise ValueError("one embedding per example")
        self.ledger = ledger
        self.config = config
        self.run_id = run_id
        self.rng = rng or np.random.default_rng()
        self.concepts = concepts
        self.embeddings = normalise(np.asarray(embeddings, dtype=float)) if len(embeddings) else embeddings
        self.examples = examples
        self._sigma: float | None = None

    def noise_multiplier(self) -> float:
        """Calibrated once for all of phase B's planned releases from what is left of its share."""
        if self._sigma is None:
            releases = self.config.releases
            self._sigma = self.ledger.calibrate(
                PHASE, lambda s: [GaussianRelease(s, 1.0, releases=releases)])
        return self._sigma

    def kmeans_round(self, centroids: np.ndarray, round: int) -> NoisyRelease:
        mechanism = GaussianRelease(self.noise_multiplier(), kmeans_sensitivity())
        stats = kmeans_stats(self.embeddings, centroids)
        return release(self.ledger, stats, mechanism, self.rng, round=round, run_id=self.run_id, what="kmeans",
                       centroids=centroids)

    def profile_release(self, centroids: np.ndarray) -> NoisyRelease:
        mechanism = GaussianRelease(self.noise_multiplier(), profile_sensitivity(self.config.max_targets))
        targets = target_matrix(self.examples, self.concepts, self.config.max_targets, self.config.seed)
        stats = profile_stats(self.embeddings, targets, centroids)
        return release(self.ledger, stats, mechanism, self.rng, round=self.config.rounds, run_id=self.run_id,
                       what="peer_profile", centroids=centroids)
