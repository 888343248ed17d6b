"""Phase B at a site: clipped per-prototype statistics of local patients, released with Gaussian noise.

Every prediction point of a patient in the splits that may inform peers takes part (train and val), and
each patient's *whole* contribution to a release is clipped, as DP-SGD clips a patient's gradient: her
per-prototype rows [sum of her points' vectors | number of her points] are scaled by one factor so that
together they have L2 norm <= the release's bound, and so that her weight in any one prototype is <= 1
(a count is then never more than the number of distinct patients behind it). Adding or removing one
patient therefore changes a release by <= its bound in L2: sqrt(2) for k-means (unit vectors plus
counts), sqrt(max_targets + 1) for the profile histogram (0/1 event rows plus counts) — the
sensitivities below. Clipping the patient rather than picking one point per patient lets a patient
whose pregnancy spans several prototypes inform each of them, which roughly doubles the signal that
the same noise has to hide.

Vectors are compared after subtracting the consortium's centre (the DP mean embedding, released in
round 0): the embeddings share most of their direction, so on the raw sphere every prototype drawn
from a public seed but one or two would win no patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pmlm.client.examples import Example
from pmlm.common.peer_profiles import centred
from pmlm.common.privacy import GaussianRelease, SiteLedger
from pmlm.common.privacy.kept import release_once, request_digest
from pmlm.common.privacy.noise import SecureNormal, noise_source_of

PHASE = "phase_b"
PEER_SPLITS = ("train", "val")  # the splits whose patients may inform peer profiles; test patients never do


def kmeans_sensitivity() -> float:
    return math.sqrt(1.0 + 1.0)  # the bound of a patient's clipped [vectors | counts] rows


def profile_sensitivity(max_targets: int) -> float:
    return math.sqrt(max_targets + 1.0)  # one point with max_targets events passes unscaled


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(vectors @ centroids.T, axis=1) if len(vectors) else np.zeros(0, int)


def patient_scale(cell_patient: np.ndarray, cell_square_norm: np.ndarray, cell_count: np.ndarray,
                  bound: float) -> np.ndarray:
    """One factor per (patient, prototype) cell: her factor, so that all her cells together have L2 norm
    <= `bound` and none of her cells counts more than 1."""
    patients = int(cell_patient.max()) + 1 if len(cell_patient) else 0
    norm = np.sqrt(np.bincount(cell_patient, weights=cell_square_norm, minlength=patients))
    most = np.zeros(patients)
    np.maximum.at(most, cell_patient, cell_count)
    factor = np.minimum(1.0, np.minimum(bound / np.maximum(norm, 1e-12), 1.0 / np.maximum(most, 1.0)))
    return factor[cell_patient]


def _cells(patients: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient of each cell, prototype of each cell, cell of each point) for the (patient, prototype) pairs."""
    keys, cell_of = np.unique(patients.astype(np.int64) * k + labels, return_inverse=True)
    return keys // k, keys % k, cell_of.reshape(-1)


def kmeans_stats(vectors: np.ndarray, patients: np.ndarray, centroids: np.ndarray,
                 bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (pre-noise) per-prototype sums of the points' vectors and counts, each patient clipped to
    `bound`; never leaves the site. `vectors` have norm <= 1 (centred and normalised embeddings)."""
    k, d = centroids.shape
    labels = assign(vectors, centroids)
    cell_patient, cell_prototype, cell_of = _cells(patients, labels, k)
    sums = np.zeros((len(cell_patient), d))
    np.add.at(sums, cell_of, vectors)
    counts = np.bincount(cell_of, minlength=len(cell_patient)).astype(float)
    scale = patient_scale(cell_patient, (sums ** 2).sum(axis=1) + counts ** 2, counts, bound)
    out = np.zeros((k, d))
    np.add.at(out, cell_prototype, sums * scale[:, None])
    return out, np.bincount(cell_prototype, weights=counts * scale, minlength=k)


def target_columns(examples: list[Example], concepts: list[str]) -> list[np.ndarray]:
    """The profile columns of each example's next-horizon events (kept sparse: sites can be large)."""
    column = {c: i for i, c in enumerate(concepts)}
    return [np.array(sorted({column[c] for c in ex.targets if c in column}), dtype=np.int64) for ex in examples]


def profile_stats(vectors: np.ndarray, patients: np.ndarray, targets: list[np.ndarray], n_concepts: int,
                  centroids: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-prototype event histograms and counts, each patient clipped to `bound`; never leaves the site."""
    k = centroids.shape[0]
    labels = assign(vectors, centroids)
    cell_patient, cell_prototype, cell_of = _cells(patients, labels, k)
    counts = np.bincount(cell_of, minlength=len(cell_patient)).astype(float)
    point_of_hit = np.repeat(np.arange(len(targets)), [len(t) for t in targets])
    columns = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    hit_keys, hits = np.unique(cell_of[point_of_hit] * n_concepts + columns, return_counts=True)
    hit_cell, hit_column = hit_keys // n_concepts, hit_keys % n_concepts
    square_norm = counts ** 2 + np.bincount(hit_cell, weights=hits.astype(float) ** 2, minlength=len(counts))
    scale = patient_scale(cell_patient, square_norm, counts, bound)
    hist = np.zeros((k, n_concepts))
    np.add.at(hist, (cell_prototype[hit_cell], hit_column), hits * scale[hit_cell])
    return hist, np.bincount(cell_prototype, weights=counts * scale, minlength=k)


@dataclass
class NoisyRelease:
    """What a site sends in phase B: noisy aggregates only, plus the ledger entry that paid for them."""

    values: np.ndarray  # stacked [per-prototype statistics | counts]
    entry: dict


@dataclass(frozen=True)
class PhaseBConfig:
    prototypes: int = 12
    rounds: int = 2  # k-means rounds: round 0 finds the centre, the others move the prototypes around it
    min_count: int = 20  # prototypes with fewer (noisy) patients are suppressed
    max_targets: int = 12  # sets the profile's clipping bound: one point with this many events passes unscaled
    seed: int = 0  # public: the initial prototypes depend only on it

    @property
    def releases(self) -> int:
        return self.rounds + 1  # the peer profile is one more release


class PhaseBSite:
    """A site's side of phase B: its patients' embeddings stay here; only noisy aggregates go out.
    Without a ledger it computes the exact statistics only (a benchmark's no-DP reference) and releases nothing."""

    def __init__(self, ledger: SiteLedger | None, examples: list[Example], embeddings: np.ndarray, concepts: list[str],
                 config: PhaseBConfig, run_id: str, rng: np.random.Generator | None = None,
                 phase_cap: float | None = None):
        if len(examples) != len(embeddings):
            raise ValueError("one embedding per example")
        self.ledger = ledger
        self.config = config
        self.run_id = run_id
        self.phase_cap = phase_cap  # at most what the run asked for (the site's policy caps the phase itself)
        self.rng = rng or SecureNormal()
        self.concepts = concepts
        self.embeddings = np.asarray(embeddings, dtype=float)
        self.examples = examples
        self.patients = np.unique([ex.patient_id for ex in examples], return_inverse=True)[1].reshape(-1)
        self.targets = target_columns(examples, concepts)
        self._sigma: float | None = None

    def noise_multiplier(self) -> float:
        """Calibrated once for all of phase B's planned releases from what is left of its share."""
        if self._sigma is None:
            releases = self.config.releases
            self._sigma = self.ledger.calibrate(
                PHASE, lambda s: [GaussianRelease(s, 1.0, releases=releases)], phase_cap=self.phase_cap)
        return self._sigma

    def bound(self, kind: str) -> float:
        return profile_sensitivity(self.config.max_targets) if kind == "profile" else kmeans_sensitivity()

    def stats(self, kind: str, centroids: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
        """Exact [statistics | counts] for a release of `kind` ("centre", "kmeans" or "profile"); never leaves
        the site. The centre round is k-means with one prototype and no centre yet."""
        vectors = centred(self.embeddings, centre)
        if kind == "profile":
            stats, counts = profile_stats(vectors, self.patients, self.targets, len(self.concepts), centroids,
                                          self.bound(kind))
        else:
            stats, counts = kmeans_stats(vectors, self.patients, centroids, self.bound(kind))
        return np.concatenate([stats, counts[:, None]], axis=1)

    def release(self, kind: str, centroids: np.ndarray, round: int, centre: np.ndarray | None,
                group: tuple[int, ...] | None = None, other_group_allowed: bool = False) -> NoisyRelease:
        """Check the budget, then draw the noise, then record: a refused release draws nothing. The same
        round asked for again with the same request by the same secure-sum `group` (a retried secure sum)
        gets the same release (common/privacy/kept.py)."""
        mechanism = GaussianRelease(self.noise_multiplier(), self.bound(kind))
        exact = self.stats(kind, centroids, centre)

        def draw() -> np.ndarray:
            return exact + self.rng.normal(0.0, mechanism.noise_stddev, size=exact.shape)

        request = request_digest(centroids, np.zeros(0) if centre is None else centre)
        noisy, entry = release_once(self.ledger, PHASE, mechanism, draw, round=round, run_id=self.run_id,
                                    request=request, extra={"release": kind}, noise_source=noise_source_of(self.rng),
                                    group=group, other_group_allowed=other_group_allowed)
        return NoisyRelease(noisy, entry)
