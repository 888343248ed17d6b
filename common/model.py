"""The next-event recommender: a small Transformer over one patient's recent care events.

Read it top to bottom. One prediction point is a short sequence:

    [ her most recent distinct events (concept, kind, days since, how often) ... | the point itself ]

The last position (the prediction point: the encounter type plus timing features such as weeks
since the first prenatal visit and gestational week) attends to her history; its final hidden
state is her patient vector. A linear head turns it into one logit per profile concept: the
probability that the concept happens within the profile's horizon (multi-label).

Everything is built from nn.Embedding, nn.Linear and nn.LayerNorm so Opacus computes per-patient
gradients with its fast hooks (no RNN/attention module replacement). Leading dimensions are free:
inputs may be (points, N) or (patients, points, N), which lets one DP "sample" be one patient with
all of her prediction points, so clipping bounds each patient's whole contribution.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def hashed_token(concept: str, n_concepts: int) -> int:
    digest = hashlib.sha1(concept.encode()).digest()
    return 1 + n_concepts + int.from_bytes(digest[:4], "big") % HASH_BUCKETS


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
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_history: int = 64
    dropout: float = 0.0

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_concepts + HASH_BUCKETS

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, cfg: RecommenderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        *lead, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # (..., n, d) -> (..., heads, n, d/heads)
        q, k, v = (t.reshape(*lead, n, self.heads, d // self.heads).transpose(-3, -2) for t in (q, k, v))
        # keep: (..., n) True for real tokens; every query may look at every real token.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[..., None, None, :])
        return self.proj(y.transpose(-3, -2).reshape(*lead, n, d))


class Block(nn.Module):
    def __init__(self, cfg: RecommenderConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), keep))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class NextEventRecommender(nn.Module):
    """history (..., N, 4) = [token, kind, gap bucket, count bucket]; point (..., 5) = [token, weeks since
    first visit, gestational week, weeks postpartum, age] buckets. Returns logits (..., n_concepts)."""

    def __init__(self, cfg: RecommenderConfig):
        super().__init__()
        self.cfg = cfg
        self.token = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD)
        self.kind = nn.Embedding(len(KINDS), cfg.dim)
        self.gap = nn.Embedding(GAP_BUCKETS, cfg.dim)
        self.count = nn.Embedding(COUNT_BUCKETS, cfg.dim)
        self.since_first_visit = nn.Embedding(WEEKS_SINCE_FIRST_VISIT, cfg.dim)
        self.gestational_week = nn.Embedding(GESTATIONAL_WEEKS, cfg.dim)
        self.postpartum = nn.Embedding(WEEKS_POSTPARTUM, cfg.dim)
        self.age = nn.Embedding(AGE_BUCKETS, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_out = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.n_concepts)
        self.apply(self._init)
        # A data-free prior: any one concept is unlikely in the horizon (p ~ 2%), so early updates
        # spend their signal on what does happen rather than on pushing every logit down.
        nn.init.constant_(self.head.bias, -4.0)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, history: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """The prediction point's final hidden state (..., dim): her patient vector before the head."""
        point_kind = torch.full_like(point[..., :1], POINT_KIND)
        zeros = torch.zeros_like(point[..., :1])
        # The point joins the sequence as its last token (one embedding call per table, which
        # keeps Opacus's per-sample gradient hooks simple).
        tokens = torch.cat([history[..., 0], point[..., :1]], dim=-1)
        kinds = torch.cat([history[..., 1], point_kind], dim=-1)
        gaps = torch.cat([history[..., 2], zeros + 1], dim=-1)  # the point happens "now"
        counts = torch.cat([history[..., 3], zeros + 1], dim=-1)
        x = self.token(tokens) + self.kind(kinds) + self.gap(gaps) + self.count(counts)
        timing = (self.since_first_visit(point[..., 1]) + self.gestational_week(point[..., 2])
                  + self.postpartum(point[..., 3]) + self.age(point[..., 4]))
        x = x + F.pad(timing.unsqueeze(-2), (0, 0, x.shape[-2] - 1, 0))  # timing on the last position only
        keep = kinds != 0
        for block in self.blocks:
            x = block(x, keep)
        return self.ln_out(x[..., -1, :])

    def forward(self, history: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(history, point))

    @torch.no_grad()
    def embed(self, history: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """L2-normalised patient vectors (..., dim) for phase B; they never leave the site."""
        return F.normalize(self.encode(history, point), dim=-1)


def build_model(n_concepts: int, **overrides) -> NextEventRecommender:
    return NextEventRecommender(RecommenderConfig(n_concepts=n_concepts, **overrides))
