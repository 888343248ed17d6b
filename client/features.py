"""Examples -> the recommender's input tensors, on site.

History becomes her most recent *distinct* events: for each concept, the days since its last
occurrence and how often it occurred, the `max_history` most recent kept. Routine visits repeat
the same twenty procedures; keeping each concept once lets a short sequence reach back months
(e.g. "fetal anatomy study done 9 weeks ago") instead of only the last visit. Notes are dropped
(their text stays in the timeline; their type says nothing beyond the encounter).
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from pmlm.client.examples import Example, History, triple_table
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
        # per (concept, kind, unit): token, kind, not skipped, concept number
        self._triple_rows = np.zeros((0, 4), dtype=np.int64)

    def token(self, concept: str) -> int:
        return concept_token(self.profile, concept)

    def history(self, example: Example) -> np.ndarray:
        if isinstance(example.history, History):
            return self._history_rows(example.history)
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

    def _history_rows(self, history: History) -> np.ndarray:
        """`history` for a History view, in array operations over her compact events: the same rows, in the same
        order (the most recent distinct concepts, ties in first-seen order), without an object per event."""
        if len(self._triple_rows) < len(triple_table()[0]):
            self._extend_triples()
        codes = history.events.codes[:history.n]
        shown = self._triple_rows[codes, 2] == 1  # notes are skipped
        kept, micros = codes[shown], history.events.micros[:history.n][shown]
        rows = np.zeros((self.max_history, 4), dtype=np.int64)
        if not len(kept):
            return rows
        concepts = self._triple_rows[kept, 3]
        _, first, counts = np.unique(concepts, return_index=True, return_counts=True)
        _, last_reversed = np.unique(concepts[::-1], return_index=True)
        last = len(concepts) - 1 - last_reversed
        days = (history.t_micros - micros[last]) / 10**6 / 86400
        order = np.lexsort((first, days))[: self.max_history][::-1]  # most recent first, then the oldest of them first
        for j, i in enumerate(order):
            token, kind = self._triple_rows[kept[last[i]], :2]
            rows[j] = (token, kind, gap_bucket(float(days[i])), count_bucket(int(counts[i])))
        return rows

    def _extend_triples(self) -> None:
        triples, concept_of = triple_table()
        start = len(self._triple_rows)
        extra = np.array([(self.token(concept), KIND_INDEX.get(kind, 0), kind not in SKIPPED_KINDS, number)
                          for (concept, kind, _), number in zip(triples[start:], concept_of[start:])],
                         dtype=np.int64).reshape(-1, 4)
        self._triple_rows = np.concatenate([self._triple_rows, extra])

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
        self.encoding = (encoder.profile.name, encoder.max_history)  # what the arrays below mean
        # Held compactly (a site of 1,000 women has ~10,000 training points; int64 histories and float targets
        # take 5 kB a point) and widened per item: tokens and buckets fit int32, targets are 0/1.
        self.encoded = [(h.to(torch.int32), p.to(torch.int32), t.to(torch.uint8))
                        for h, p, t in (encoder.encode(exs) for _, exs in sorted(by_patient.items()))]
        self.rng = random.Random(seed)

    def resampled(self, points_per_patient: int, seed: int) -> "PatientDataset":
        """The same encoded patients (shared, not copied), drawn `points_per_patient` at a time from `seed`:
        encoding a site's patients costs more than a few epochs of training on them."""
        other = copy.copy(self)
        other.points_per_patient, other.rng = points_per_patient, random.Random(seed)
        return other

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        history, point, targets = self.encoded[i]
        n, p = history.shape[0], self.points_per_patient
        chosen = sorted(self.rng.sample(range(n), p)) if n > p else list(range(n))
        history, point, targets = history[chosen].long(), point[chosen].long(), targets[chosen].float()
        pad = p - len(chosen)
        mask = torch.zeros(p)
        mask[: len(chosen)] = 1.0
        point_pad = torch.zeros((pad, point.shape[1]), dtype=torch.long)
        return (torch.cat([history, torch.zeros((pad, *history.shape[1:]), dtype=torch.long)]),
                torch.cat([point, point_pad]),
                torch.cat([targets, torch.zeros((pad, targets.shape[1]))]),
                mask)
