"""Peer prototypes and their DP profiles: the global artifact of phase B, and the peer section it yields on-site.

A prototype is a direction from the consortium's centre (the DP mean embedding): embeddings share most
of their direction, so patients are told apart by where they lie *around* the centre. Its profile is a
DP estimate of how many training patients fell nearest to it and what fraction of their prediction
points were followed by each care event within the horizon. A site matches *her* embedding (never
sent) against the prototypes locally.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from pmlm.common.atomic import write_atomic
from pmlm.common.profiles import TaskProfile


def initial_centroids(k: int, dim: int, seed: int) -> np.ndarray:
    """Data-independent start: k random directions from a public seed (no patient's embedding is used)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def centred(embeddings: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """Unit directions of the embeddings seen from `centre` (no centre: the embeddings' own directions)."""
    embeddings = np.asarray(embeddings, dtype=float)
    return normalise(embeddings if centre is None else normalise(embeddings) - centre)


@dataclass
class PeerProfiles:
    centroids: np.ndarray  # (k, d), unit rows
    counts: np.ndarray  # (k,) noisy number of patients per prototype
    rates: np.ndarray  # (k, V) noisy fraction of those patients with each concept in the horizon
    suppressed: np.ndarray  # (k,) bool: noisy count below the minimum, never shown
    count_noise_std: float  # std of the Gaussian noise on each count/histogram cell
    concepts: list[str]  # column order of `rates`
    horizon_days: int
    min_count: int
    centre: np.ndarray | None = None  # (d,) the consortium's DP mean embedding; None: prototypes on the raw sphere

    def save(self, path: Path) -> None:
        path = Path(path)
        arrays = io.BytesIO()
        np.savez(arrays, centroids=self.centroids, counts=self.counts, rates=self.rates, suppressed=self.suppressed,
                 **({} if self.centre is None else {"centre": self.centre}))
        meta = {"count_noise_std": self.count_noise_std, "concepts": self.concepts,
                "horizon_days": self.horizon_days, "min_count": self.min_count}
        write_atomic(path.with_suffix(".npz"), arrays.getvalue())
        write_atomic(path.with_suffix(".json"), json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> "PeerProfiles":
        path = Path(path)
        arrays = np.load(path.with_suffix(".npz"))
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(arrays["centroids"], arrays["counts"], arrays["rates"], arrays["suppressed"].astype(bool),
                   float(meta["count_noise_std"]), list(meta["concepts"]), int(meta["horizon_days"]),
                   int(meta["min_count"]), arrays["centre"] if "centre" in arrays.files else None)

    def weights(self, embedding: np.ndarray, temperature: float = 0.1, top: int = 3) -> np.ndarray:
        """Soft assignment of one embedding to the visible prototypes (the `top` nearest, softmax on cosine)."""
        sims = self.centroids @ centred(embedding, self.centre)
        sims = np.where(self.suppressed, -np.inf, sims)
        order = np.argsort(-sims)[:top]
        order = order[np.isfinite(sims[order])]
        w = np.zeros(len(sims))
        if order.size:
            z = np.exp((sims[order] - sims[order].max()) / temperature)
            w[order] = z / z.sum()
        return w

    def peer_rates(self, embedding: np.ndarray) -> tuple[np.ndarray, float]:
        """(rate per concept, about how many patients) for the soft neighbourhood of this embedding."""
        w = self.weights(embedding)
        return w @ self.rates, float(w @ self.counts)

    def ranking(self, embedding: np.ndarray, k: int) -> list[str]:
        rates, _ = self.peer_rates(embedding)
        return [self.concepts[i] for i in np.argsort(-rates, kind="stable")[:k]]


def honest_count(n: float, noise_std: float) -> str:
    """'about 340': rounded to a step no finer than the noise allows."""
    step = 10 ** max(0, math.floor(math.log10(max(noise_std * 2, 1))))
    step = max(step, 10 if n >= 100 else 5)
    return f"about {int(round(n / step) * step)}"


def honest_percent(rate: float, n: float, noise_std: float) -> str:
    """'about 60%': the rounding step grows with the uncertainty of the noisy fraction."""
    rate = min(max(rate, 0.0), 1.0)
    uncertainty = math.sqrt(2) * noise_std / max(n, 1.0) + math.sqrt(rate * (1 - rate) / max(n, 1.0))
    step = 0.05 if uncertainty < 0.05 else 0.1 if uncertainty < 0.15 else 0.25
    value = round(rate / step) * step
    if value <= 0:
        return "few"
    return f"about {int(round(value * 100))}%"


def clear_of_noise(profiles: PeerProfiles, rates: np.ndarray, n: float, family_error: float = 0.05) -> np.ndarray:
    """Which rates stand clear of the DP noise: the patients behind a rate (rate x n) lie more noise stds above
    zero than the largest of the profile's noise-only cells would reach by chance (a Bonferroni bound over its
    concepts). At a small budget the noise outweighs most cells, and a rare event would otherwise be shown
    to the LLM as 'about 50% had ...' for no reason but noise."""
    z = NormalDist().inv_cdf(1.0 - family_error / max(len(profiles.concepts), 1))
    return rates * n > z * profiles.count_noise_std


def peer_facts(profiles: PeerProfiles, embedding: np.ndarray, profile: TaskProfile, top: int = 5,
               risks: bool = True, impossible: Collection[str] = (),
               left_out: list[tuple[str, str]] | None = None) -> list[str]:
    """Readable peer-informed facts for the prompt, e.g. 'about 60% had a fetal anatomy study within 12 weeks';
    only rates clear of the DP noise are stated. A fact about a concept in `impossible` (it cannot follow her
    stage) is not stated; each one that would have been is added to `left_out` as (concept, fact)."""
    rates, n = profiles.peer_rates(embedding)
    clear = clear_of_noise(profiles, rates, n)
    if n <= 0 or not np.any(clear):
        return []
    weeks = round(profiles.horizon_days / 7)
    facts = [f"Among {honest_count(n, profiles.count_noise_std)} similar patients across the consortium:"]
    shown = 0
    for i in np.argsort(-rates, kind="stable"):
        concept = profiles.concepts[i]
        if not clear[i]:
            break  # sorted by rate: every later one is below this one
        if concept in profile.risks:
            continue
        fact = (f"{honest_percent(rates[i], n, profiles.count_noise_std)} had {profile.name_of(concept)} "
                f"within {weeks} weeks")
        if concept in impossible:
            if left_out is not None:
                left_out.append((concept, fact))
            continue
        facts.append(fact)
        shown += 1
        if shown >= top:
            break
    if risks:
        for concept in profile.risk_ids:
            i = profiles.concepts.index(concept) if concept in profiles.concepts else None
            if i is not None and clear[i]:
                fact = f"{honest_percent(rates[i], n, profiles.count_noise_std)} developed {profile.name_of(concept)}"
                if concept in impossible:
                    if left_out is not None:
                        left_out.append((concept, fact))
                    continue
                facts.append(fact)
    return facts
