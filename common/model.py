"""The next-event recommender: a stage table plus her own recurrences, small enough to train under DP.

Read it top to bottom. For one prediction point it scores every profile concept (the logit that
the concept happens within the profile's horizon, multi-label) as a sum of four parts:

    logit[c] = prior[c]                           public: the profile's own-pathway concepts start likelier
             + popularity[c]                      learned: how common c is, whatever her stage
             + stage_type[encounter type, c]      learned: what follows this kind of encounter
             + stage_step[4-week step, c]         learned: what follows this point of care (weeks since
                                                  the first prenatal visit)
             + stage[type and step together, c]   learned: what the two parts above miss
             + recurrence[c, how long ago she last had c]   learned: her own repeats and one-offs

The stage tables are the gestational-timing baseline made learnable; the recurrence table is the
bag of her past events (one weight per concept and recency bucket). The stage is split into a type
part, a step part and their interaction because DP-SGD moves the weights only so far in a run (each
step by at most the learning rate times the clipping norm): a weight shared by every step of one
encounter type, or by every type at one step, moves the logits of many stages at once (Recall@5
0.81 -> 0.82 at eps 3 in bench/recsys.py). Why so small: a hospital has
a few hundred patients and DP-SGD adds the same noise to every weight, so each weight must be
learned from many patients. The stage table covers only the profile's own-pathway concepts
(flagged ``obgyn`` in the profile: public, derived from the generator's module definitions), the
concepts a pathway stage actually predicts; other concepts keep their prior, popularity and
recurrence weights, so noise in hundreds of rarely-seen stage columns cannot push them into a top-5.

Her patient vector (phase B's embedding, phase C's state) is what the model expects for her: her
predicted probabilities of the own-pathway concepts, through a fixed public random projection to
`dim` coordinates, L2-normalised. Patients close in it expect the same care next.

Every learned weight sits in an nn.Embedding, so Opacus computes per-patient gradients with its
fast hooks. Leading dimensions are free: inputs may be (points, N) or (patients, points, N), which
lets one DP "sample" be one patient with all of her prediction points.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import EVENT_KINDS

# Token ids: 0 pad, then the profile's concepts, then hash buckets for concepts outside the profile
# (observations, notes' types, ...). Hashing needs no shared data-derived vocabulary between sites.
PAD = 0
HASH_BUCKETS = 256
# Kinds: 0 pad, the schema's event kinds, and one kind for the prediction point itself.
KINDS = ("<pad>", *EVENT_KINDS, "<point>")
POINT_KIND = len(KINDS) - 1
# Days since an event, log-spaced bucket edges (bucket 0 is padding).
GAP_EDGES_DAYS = (0.5, 1.5, 3.5, 7.5, 14.5, 30.5, 60.5, 91, 182, 365, 730)
GAP_BUCKETS = len(GAP_EDGES_DAYS) + 2
COUNT_BUCKETS = 6  # 0 pad, seen 1, 2, 3-4, 5-8, 9+ times
# Timing features of the prediction point, weekly buckets; the last bucket of each means "not applicable".
WEEKS_SINCE_FIRST_VISIT = 46
GESTATIONAL_WEEKS = 46
WEEKS_POSTPARTUM = 27
AGE_BUCKETS = 10  # 5-year bands from 15, last = unknown
# Stages: the point's encounter type x 4-week steps since the first prenatal visit (the last step
# also holds 44+ weeks), plus one step for points outside a pregnancy.
STAGE_WEEKS = 4
STAGE_STEPS = (WEEKS_SINCE_FIRST_VISIT - 2) // STAGE_WEEKS + 1 + 1
# Public priors (logits): an own-pathway concept ~5% likely within the horizon, any other ~0.25%.
PRIOR_PATHWAY, PRIOR_OTHER = -3.0, -6.0
PROJECTION_SEED = 0


def hashed_token(concept: str, n_concepts: int) -> int:
    digest = hashlib.sha1(concept.encode()).digest()
    return 1 + n_concepts + int.from_bytes(digest[:4], "big") % HASH_BUCKETS


def concept_token(profile: TaskProfile, concept: str) -> int:
    i = profile.index.get(concept)
    return 1 + i if i is not None else hashed_token(concept, len(profile))


def gap_bucket(days: float) -> int:
    for i, edge in enumerate(GAP_EDGES_DAYS):
        if days < edge:
            return 1 + i
    return len(GAP_EDGES_DAYS) + 1


def count_bucket(count: int) -> int:
    return 1 if count <= 1 else 2 if count == 2 else 3 if count <= 4 else 4 if count <= 8 else 5


def week_bucket(weeks: float | None, n: int) -> int:
    """Whole weeks clamped to [0, n-2]; n-1 when the feature does not apply (e.g. not pregnant)."""
    if weeks is None:
        return n - 1
    return min(max(int(math.floor(weeks)), 0), n - 2)


def age_bucket(years: float | None) -> int:
    if years is None:
        return AGE_BUCKETS - 1
    return min(max(int((years - 15) // 5), 0), AGE_BUCKETS - 2)


@dataclass(frozen=True)
class RecommenderConfig:
    n_concepts: int  # size of the profile vocabulary = number of outputs
    dim: int = 64  # length of the patient vector (phase B's embedding)
    max_history: int = 64
    point_tokens: tuple[int, ...] = ()  # tokens of the profile's prediction-point encounter types, in order
    pathway: tuple[int, ...] = ()  # concept indices with a stage column; () means every concept

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_concepts + HASH_BUCKETS

    @property
    def stage_columns(self) -> tuple[int, ...]:
        return self.pathway or tuple(range(self.n_concepts))

    @property
    def stages(self) -> int:
        return (len(self.point_tokens) + 1) * STAGE_STEPS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RecommenderConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("point_tokens", "pathway"):  # JSON gives lists
            known[key] = tuple(known.get(key, ()))
        return cls(**known)


def recommender_config(profile: TaskProfile, **overrides) -> RecommenderConfig:
    """The model's configuration for a profile: its prediction points and own-pathway concepts (both public)."""
    return RecommenderConfig(
        n_concepts=len(profile),
        point_tokens=tuple(concept_token(profile, c) for c in sorted(profile.prediction_points)),
        pathway=tuple(i for i, c in enumerate(profile.concepts) if c.obgyn),
        **overrides,
    )


class NextEventRecommender(nn.Module):
    """history (..., N, 4) = [token, kind, gap bucket, count bucket]; point (..., 5) = [token, weeks since
    first visit, gestational week, weeks postpartum, age] buckets. Returns logits (..., n_concepts)."""

    def __init__(self, cfg: RecommenderConfig):
        super().__init__()
        self.cfg = cfg
        columns = torch.tensor(cfg.stage_columns, dtype=torch.long)
        self.stage = nn.Embedding(cfg.stages, len(columns))
        self.stage_type = nn.Embedding(len(cfg.point_tokens) + 1, len(columns))
        self.stage_step = nn.Embedding(STAGE_STEPS, len(columns))
        self.popularity = nn.Embedding(1, cfg.n_concepts)  # one row, looked up at index 0
        self.recurrence = nn.Embedding(cfg.n_concepts * GAP_BUCKETS, 1)
        for table in (self.stage, self.stage_type, self.stage_step, self.popularity, self.recurrence):
            nn.init.zeros_(table.weight)
        # The per-concept weights (popularity, recurrence) act as concept_scale x the stored weight;
        # 1 except while DP-SGD trains them in a scaled parametrisation (client/train.py says why).
        self.concept_scale = 1.0
        # Constants derived from the configuration (public); not weights, so they never travel.
        prior = torch.full((cfg.n_concepts,), PRIOR_OTHER if cfg.pathway else PRIOR_PATHWAY)
        prior[list(cfg.pathway)] = PRIOR_PATHWAY
        point_type = torch.full((cfg.vocab_size,), len(cfg.point_tokens), dtype=torch.long)
        for i, token in enumerate(cfg.point_tokens):
            point_type[token] = i
        projection = torch.randn(len(columns), cfg.dim, generator=torch.Generator().manual_seed(PROJECTION_SEED))
        self.register_buffer("prior", prior, persistent=False)
        self.register_buffer("columns", columns, persistent=False)
        self.register_buffer("point_type", point_type, persistent=False)
        self.register_buffer("projection", projection / math.sqrt(cfg.dim), persistent=False)

    def stage_of(self, point: torch.Tensor) -> torch.Tensor:
        weeks = point[..., 1]
        step = torch.where(weeks == WEEKS_SINCE_FIRST_VISIT - 1, STAGE_STEPS - 1,
                           weeks.clamp(max=WEEKS_SINCE_FIRST_VISIT - 2) // STAGE_WEEKS)
        return self.point_type[point[..., 0]] * STAGE_STEPS + step

    def recurrence_rows(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each history row (..., N): its concept, the recurrence weight's row for its gap bucket, and whether
        it counts (a profile concept with a gap bucket; padding and concepts outside the profile do not).

        Only the concepts she had are looked up, N of them, not all n_concepts: the features list each concept
        once, so one row per concept is the weight of her last gap. (Looking up every concept and masking the
        absent ones spent 80% of a training step in the embedding's backward pass.) Rows that do not count are
        masked rather than looked up in a padding row: Opacus ignores `padding_idx`, so a shared padding row
        would collect their gradient.
        """
        tokens = history[..., 0]
        counts = (tokens >= 1) & (tokens <= self.cfg.n_concepts) & (history[..., 2] > 0)
        concept = torch.where(counts, tokens - 1, 0)
        return concept, concept * GAP_BUCKETS + torch.where(counts, history[..., 2], 0), counts

    def forward(self, history: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        index = self.stage_of(point)
        stage = self.stage(index) + self.stage_type(index // STAGE_STEPS) + self.stage_step(index % STAGE_STEPS)
        logits = self.prior.expand(*point.shape[:-1], -1).index_add(-1, self.columns, stage)
        concept, rows, counts = self.recurrence_rows(history)
        recurrence = torch.zeros_like(logits).scatter_add(-1, concept, self.recurrence(rows).squeeze(-1) * counts)
        popularity = self.popularity(torch.zeros_like(point[..., 0]))
        return logits + self.concept_scale * (popularity + recurrence)

    @torch.no_grad()
    def embed(self, history: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """L2-normalised patient vectors (..., dim) for phase B; they never leave the site."""
        expected = torch.sigmoid(self(history, point)).index_select(-1, self.columns)
        return F.normalize(expected @ self.projection, dim=-1)


def build_model(profile_or_concepts: TaskProfile | int, **overrides) -> NextEventRecommender:
    if isinstance(profile_or_concepts, int):
        return NextEventRecommender(RecommenderConfig(n_concepts=profile_or_concepts, **overrides))
    return NextEventRecommender(recommender_config(profile_or_concepts, **overrides))
