"""Examples -> the recommender's input tensors, on site.

History becomes her most recent *distinct* events: for each concept, the days since its last
occurrence and how often it occurred, the `max_history` most recent kept. Routine visits repeat
the same twenty procedures; keeping each concept once lets a short sequence reach back months
(e.g. "fetal anatomy study done 9 weeks ago") instead of only the last visit. Notes are dropped
(their text stays in the timeline; their type says nothing beyond the encounter).
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from pmlm.client.examples import Example
from pmlm.common.model import (
    GESTATIONAL_WEEKS,
    KINDS,
    WEEKS_POSTPARTUM,
    WEEKS_SINCE_FIRST_VISIT,
    age_bucket,
    concept_token,
    count_bucket,
    gap_bucket,
    week_bucket,
)
from pmlm.common.profiles import TaskProfile

KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
SKIPPED_KINDS = {"note"}


class FeatureEncoder:
    """Maps one Example to (history (N, 4), point (5,), targets (C,)) arrays for one profile."""

    def __init__(self, profile: TaskProfile, max_history: int = 64):
        self.profile = profile
        self.max_history = max_history
        self.n_concepts = len(profile)

    def token(self, concept: str) -> int:
        return concept_token(self.profile, concept)

    def history(self, example: Example) -> np.ndarray:
        last_seen: dict[str, tuple[float, str]] = {}
        counts: dict[str, int] = defaultdict(int)
        for item in example.history:  # oldest first; later items overwrite
            if item.kind in SKIPPED_KINDS:
                continue
            last_seen[item.concept] = (item.days_before, item.kind)
            counts[item.concept] += 1
        recent = sorted(last_seen.items(), key=lambda kv: kv[1][0])[: self.max_history]
        rows = np.zeros((self.max_history, 4), dtype=np.int64)
        for j, (concept, (days, kind)) in enumerate(reversed(recent)):  # oldest of the kept first
            rows[j] = (self.token(concept), KIND_INDEX.get(kind, 0), gap_bucket(days), count_bucket(counts[concept]))
        return rows

    def point(self, example: Example) -> np.ndarray:
        return np.array([
            self.token(example.point),
            week_bucket(example.weeks_since_first_visit, WEEKS_SINCE_FIRST_VISIT),
            week_bucket(None if example.gestational_week is None else example.gestational_week,
                        GESTATIONAL_WEEKS),
            week_bucket(example.weeks_postpartum, WEEKS_POSTPARTUM),
            age_bucket(example.age_years),
        ], dtype=np.int64)

    def targets(self, example: Example) -> np.ndarray:
        y = np.zeros(self.n_concepts, dtype=np.float32)
        for c in example.targets:
            i = self.profile.index.get(c)
            if i is not None:
                y[i] = 1.0
        return y

    def encode(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked (history (E, N, 4), point (E, 5), targets (E, C)) for a list of examples."""
        if not examples:
            return (torch.zeros((0, self.max_history, 4), dtype=torch.long), torch.zeros((0, 5), dtype=torch.long),
                    torch.zeros((0, self.n_concepts)))
        return (torch.from_numpy(np.stack([self.history(e) for e in examples])),
                torch.from_numpy(np.stack([self.point(e) for e in examples])),
                torch.from_numpy(np.stack([self.targets(e) for e in examples])))


class PatientDataset(Dataset):
    """One item per patient: up to `points_per_patient` of her prediction points, padded.

    Returns (history (P, N, 4), point (P, 5), targets (P, C), mask (P,)). With one patient per item,
    DP-SGD's per-sample clipping bounds a whole patient's influence (the privacy unit), and Poisson
    sampling of items is sampling of patients. A patient with more points contributes a random
    subset each time she is drawn.
    """

    def __init__(self, examples: list[Example], encoder: FeatureEncoder, points_per_patient: int = 32,
                 seed: int = 0):
        by_patient: dict[str, list[Example]] = defaultdict(list)
        for ex in examples:
            by_patient[ex.patient_id].append(ex)
        self.points_per_patient = points_per_patient
        self.encoded = [encoder.encode(exs) for _, exs in sorted(by_patient.items())]
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        history, point, targets = self.encoded[i]
        n, p = history.shape[0], self.points_per_patient
        chosen = sorted(self.rng.sample(range(n), p)) if n > p else list(range(n))
        pad = p - len(chosen)
        mask = torch.zeros(p)
        mask[: len(chosen)] = 1.0
        point_pad = torch.zeros((pad, point.shape[1]), dtype=torch.long)
        return (torch.cat([history[chosen], torch.zeros((pad, *history.shape[1:]), dtype=torch.long)]),
                torch.cat([point[chosen], point_pad]),
                torch.cat([targets[chosen], torch.zeros((pad, targets.shape[1]))]),
                mask)
