"""Phase B at a site, Flower-free (client_app.py turns messages into these calls): embed local patients with the
global model, release noisy per-prototype statistics (clipped per patient, with Gaussian noise), keep the
resulting global peer profiles. Embeddings are computed and kept here.

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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pmlm.client.examples import Example
from pmlm.client.phase_a import load_global_model
from pmlm.common.atomic import write_atomic
from pmlm.common.peer_profiles import PeerProfiles, centred
from pmlm.common.phase_b import PHASE, PhaseBConfig
from pmlm.common.privacy import BudgetConfig, GaussianRelease, SiteLedger
from pmlm.common.privacy.kept import release_once, request_digest
from pmlm.common.privacy.noise import SecureNormal, noise_source_of
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseSharing
from pmlm.common.site_layout import PEER_PROFILES, current_manifest, plan_file

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
    noise_std: float  # of the noise this site added (public: the coordinator adds the sites' variances)


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
                group: tuple[int, ...] | None = None, other_group_allowed: bool = False,
                noise: NoiseSharing = SITE_NOISE) -> NoisyRelease:
        """Check the budget, then draw the noise, then record: a refused release draws nothing. The same
        round asked for again with the same request by the same secure-sum `group` (a retried secure sum)
        gets the same release (common/privacy/kept.py). `noise`: the site's share of the noise the ledger
        prices (all of it unless the site checked a secure sum it may share it with)."""
        mechanism = GaussianRelease(self.noise_multiplier(), self.bound(kind))
        exact = self.stats(kind, centroids, centre)
        noise_std = noise.own_stddev(mechanism)

        def draw() -> np.ndarray:
            return exact + self.rng.normal(0.0, noise_std, size=exact.shape)

        request = request_digest(centroids, np.zeros(0) if centre is None else centre)
        noisy, entry = release_once(self.ledger, PHASE, mechanism, draw, round=round, run_id=self.run_id,
                                    request=request, extra={"release": kind}, noise_source=noise_source_of(self.rng),
                                    group=group, other_group_allowed=other_group_allowed, noise=noise)
        return NoisyRelease(noisy, entry, noise_std)


@torch.no_grad()
def embed_examples(model, encoder, examples: list[Example], batch_size: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(examples), batch_size):
        history, point, _ = encoder.encode(examples[i:i + batch_size])
        out.append(model.embed(history, point).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.dim), dtype=np.float32)


class SitePhaseB:
    def __init__(self, site_id: str, site_dir: Path, examples: list[Example], config: PhaseBConfig, run_id: str,
                 budget: BudgetConfig | None = None, phase_cap: float | None = None):
        self.site_id, self.site_dir, self.run_id = site_id, Path(site_dir), run_id
        model, encoder, _ = load_global_model(self.site_dir)
        chosen = [ex for ex in examples if ex.split in PEER_SPLITS]
        ledger = SiteLedger(self.site_dir, site_id, budget)
        concepts = [c.id for c in encoder.profile.concepts]
        self.site = PhaseBSite(ledger, chosen, embed_examples(model, encoder, chosen), concepts, config, run_id,
                               phase_cap=phase_cap)
        # The noise is calibrated once per run; a node that runs each message in a fresh process (the
        # Deployment Engine) must find the same plan, not re-calibrate on what is left after round 1.
        self.plan_path = self.site_dir / plan_file(PHASE, run_id)
        if self.plan_path.exists():
            self.site._sigma = float(json.loads(self.plan_path.read_text())["noise_multiplier"])

    def release(self, kind: str, centroids: np.ndarray, round: int, centre: np.ndarray | None,
                **group) -> NoisyRelease:
        """`group`: the secure-sum group and whether another may get a kept release (PhaseBSite.release)."""
        if not self.plan_path.exists():
            write_atomic(self.plan_path, json.dumps({"run_id": self.run_id,
                                                     "noise_multiplier": self.site.noise_multiplier()}))
        return self.site.release(kind, centroids, round, centre, **group)


def store_peer_profiles(site_dir: Path, ledger: SiteLedger, run_id: str, profiles: PeerProfiles) -> Path:
    """Keep the global peer profiles with the ledger entries of this site's releases that built them.

    The entries are read from the ledger, not from memory: the node may have run each release in another
    process (the Deployment Engine starts one per message)."""
    path = Path(site_dir) / PEER_PROFILES
    profiles.save(path)
    write_phase_manifest(site_dir, ledger, "phase_b", run_id,
                         {"prototypes": int(len(profiles.counts)), "suppressed": int(profiles.suppressed.sum())})
    return path


def write_phase_manifest(site_dir: Path, ledger: SiteLedger, phase: str, run_id: str, extra: dict) -> Path:
    """SITE/<phase>/current.json: the artifact and the signed ledger releases of this run that produced it."""
    releases = [e for e in ledger.entries()
                if e.get("kind") == "release" and e.get("phase") == phase and e.get("run_id") == run_id]
    last = releases[-1] if releases else {}
    manifest = {"phase": phase, "run_id": run_id, "site_id": ledger.site_id, "path": phase, **extra,
                "ledger_release": {"seq": last.get("seq"), "signature": last.get("signature")},
                "ledger_releases": [{"seq": e["seq"], "signature": e["signature"], "epsilon": e["epsilon"]}
                                    for e in releases]}
    return write_atomic(Path(site_dir) / current_manifest(phase), json.dumps(manifest, indent=2))
