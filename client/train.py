"""Local training and evaluation of the recommender at one site: non-private, or DP-SGD with Opacus.

The ML half of phase A (the Flower half is client_app.py). DP-SGD here is record-level DP with the
patient as the unit: one dataset item is one patient (features.PatientDataset), Opacus clips each
patient's gradient to `clipping_norm`, adds Gaussian noise of std noise_multiplier * clipping_norm,
and samples patients with Poisson sampling. The noise multiplier is not chosen here: the caller
calibrates it once for the whole planned run (`dp_plan` + the site ledger) and passes it in.

What makes DP-SGD work on a few hundred patients (measured in bench/recsys.py):
- a clipping norm below every patient's gradient norm, so each patient's gradient is a unit of
  direction and the noise is no larger than it needs to be;
- plain SGD, not Adam: Adam rescales every weight's step to about the learning rate, so weights
  that receive only noise take full-size random steps, and it flattens the differences in evidence
  that a ranking needs; SGD keeps each update proportional to the evidence;
- the per-concept tables (popularity, recurrence) trained as 10x their logit weights
  (DP_CONCEPT_SCALE): each of their weights is seen at most of a patient's points, so unscaled they
  would take most of each patient's clipped gradient and move much faster than the stage table.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from pmlm.client.examples import Example
from pmlm.client.features import FeatureEncoder, PatientDataset
from pmlm.common.metrics import auroc, mean_ignoring_nan, ndcg_at_k, recall_at_k
from pmlm.common.model import NextEventRecommender
from pmlm.common.phase_a import dp_plan

# The per-concept weights are trained as weight / DP_CONCEPT_SCALE under DP-SGD: a tenth of the
# gradient (so of the clipping budget) and a hundredth of the step of an unscaled weight.
DP_CONCEPT_SCALE = 0.1


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 50  # patients per step (non-private training)
    sampling_rate: float = 0.5  # DP-SGD: the public Poisson rate, a patient's chance to be in a step's batch
    lr: float = 0.3
    optimizer: str = "adam"  # or "sgd", the one DP-SGD uses
    momentum: float = 0.0  # sgd only
    points_per_patient: int = 32
    # DP-SGD; noise_multiplier None means non-private training
    noise_multiplier: float | None = None
    clipping_norm: float = 0.3
    seed: int = 0


@dataclass
class TrainReport:
    steps: int
    sample_rate: float
    loss: float
    seconds: float
    noise_multiplier: float | None = None
    clipping_norm: float | None = None
    opacus_history: list = field(default_factory=list)  # [(sigma, q, steps)] of the site's Opacus RDP accountant


def patient_loss(model, history, point, targets, mask) -> torch.Tensor:
    """Mean over patients of (mean over her points of the summed binary cross-entropy over concepts)."""
    logits = model(history, point)
    per_point = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    per_patient = (per_point * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_patient.sum() / max(per_patient.shape[0], 1)  # an empty Poisson batch gives 0, not nan


def train_local(model: NextEventRecommender, dataset: PatientDataset, settings: TrainSettings,
                opacus_history: list | None = None,
                after_epoch: Callable[[int], None] | None = None) -> TrainReport:
    """Train `model` in place for `settings.epochs` local epochs; DP-SGD when a noise multiplier is given.

    `after_epoch(epoch)` (1-based) is called after each epoch with `model` in logit units (on-site fine-tuning
    scores and keeps each epoch's weights there; its optimizer runs on across epochs)."""
    torch.manual_seed(settings.seed)
    private = settings.noise_multiplier is not None
    with scaled_concept_tables(model, DP_CONCEPT_SCALE if private else 1.0):
        optimizer = (torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
                     if settings.optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=settings.lr))
        sample_rate, planned_steps = dp_plan(settings.sampling_rate, settings.epochs)
        if private:  # Poisson batches at the public rate: 1/rate of them an epoch, whatever the site's size
            loader = DPDataLoader(dataset, sample_rate=sample_rate,
                                  generator=torch.Generator().manual_seed(settings.seed))
        else:
            loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(settings.seed))
            sample_rate = settings.batch_size / max(len(dataset), 1)
        engine = None
        net = model
        model.train()  # Opacus validates in training mode; evaluation may have left it in eval mode
        if private:
            engine, net, optimizer, loader = make_private(model, optimizer, loader, settings, opacus_history)
        net.train()
        losses, steps, start = [], 0, time.perf_counter()
        for epoch in range(settings.epochs):
            for history, point, targets, mask in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = patient_loss(net, history, point, targets, mask)
                loss.backward()
                optimizer.step()
                steps += 1
                if history.shape[0]:
                    losses.append(loss.item())
            if after_epoch is not None:
                with logit_units(model):
                    after_epoch(epoch + 1)
        seconds = time.perf_counter() - start
        if private:
            net.cleanup()  # unhook `model` so the next round can wrap it again
            assert steps == planned_steps, f"ran {steps} DP-SGD steps, planned {planned_steps}"
    return TrainReport(
        steps=steps, sample_rate=sample_rate, loss=float(np.mean(losses)) if losses else float("nan"),
        seconds=seconds, noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clipping_norm if private else None,
        opacus_history=[list(h) for h in engine.accountant.history] if engine else [],
    )


@contextmanager
def logit_units(model: NextEventRecommender):
    """Inside, the model's per-concept tables are in logit units (as stored and served), whatever training's
    parametrisation; training resumes where it was."""
    scale = model.concept_scale
    if scale == 1.0:
        yield
        return
    tables = (model.popularity.weight, model.recurrence.weight)
    with torch.no_grad():
        for weight in tables:
            weight.mul_(scale)
    model.concept_scale = 1.0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight in tables:
                weight.div_(scale)
        model.concept_scale = scale


@contextmanager
def scaled_concept_tables(model: NextEventRecommender, scale: float):
    """Train the per-concept weights as weight / scale; the model leaves in logit units whatever happens."""
    tables = (model.popularity.weight, model.recurrence.weight)
    with torch.no_grad():
        for weight in tables:
            weight.div_(scale)
    model.concept_scale = scale
    try:
        yield
    finally:
        with torch.no_grad():
            for weight in tables:
                weight.mul_(scale)
        model.concept_scale = 1.0


def make_private(model, optimizer, loader, settings: TrainSettings, opacus_history: list | None):
    """Opacus's front door with a fixed noise multiplier; the site's RDP history carried across rounds.

    A fresh PrivacyEngine per round would restart Opacus's accountant at zero; restoring the
    history keeps its (secondary) epsilon cumulative. The ledger, not Opacus, is the authority.
    """
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in (opacus_history or [])]
    with warnings.catch_warnings():
        # secure_mode needs torchcsprng, which is unavailable; the audit report says so.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        logging.getLogger("opacus").setLevel(logging.ERROR)
        net, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clipping_norm, poisson_sampling=False,  # the loader already samples
        )
    return engine, net, optimizer, loader


def model_state(model) -> dict[str, torch.Tensor]:
    """The plain module's weights, whether or not Opacus wrapped it (no `_module.` prefix)."""
    return getattr(model, "_module", model).state_dict()


@torch.no_grad()
def predict(model: NextEventRecommender, examples: list[Example], encoder: FeatureEncoder,
            batch_size: int = 256) -> np.ndarray:
    """Probabilities (E, C) of every profile concept within the horizon, for each example."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        history, point, _ = encoder.encode(examples[i:i + batch_size])
        out.append(torch.sigmoid(model(history, point)).numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.n_concepts), dtype=np.float32)


def point_scores(probs: np.ndarray, examples: list[Example], encoder: FeatureEncoder,
                 k: int = 5) -> tuple[np.ndarray, np.ndarray, list[Example]]:
    """Recall@k and NDCG@k of each example with targets (the points every ranking figure averages), and those
    examples (their patient ids are what a bootstrap over patients resamples)."""
    concepts = [c.id for c in encoder.profile.concepts]
    top = np.argsort(-probs, axis=1)[:, :k] if len(examples) else np.zeros((0, k), dtype=int)
    recalls, ndcgs, scored = [], [], []
    for row, ex in zip(top, examples):
        if ex.targets:
            ranked = [concepts[j] for j in row]
            recalls.append(recall_at_k(ranked, ex.targets, k))
            ndcgs.append(ndcg_at_k(ranked, ex.targets, k))
            scored.append(ex)
    return np.asarray(recalls, dtype=float), np.asarray(ndcgs, dtype=float), scored


def ranking_metrics(probs: np.ndarray, examples: list[Example], encoder: FeatureEncoder, k: int = 5) -> dict:
    """Recall@k, NDCG@k, micro-AUROC over all concepts, and micro-AUROC over the profile's risk concepts."""
    labels = np.stack([encoder.targets(e) for e in examples]) if examples else np.zeros_like(probs)
    recalls, ndcgs, _ = point_scores(probs, examples, encoder, k)
    risk_cols = [encoder.profile.index[c] for c in encoder.profile.risk_ids if c in encoder.profile.index]
    return {
        f"recall@{k}": mean_ignoring_nan(recalls),
        f"ndcg@{k}": mean_ignoring_nan(ndcgs),
        "micro_auroc": auroc(probs, labels) if len(examples) else float("nan"),
        "risk_auroc": auroc(probs[:, risk_cols], labels[:, risk_cols]) if risk_cols and len(examples) else float("nan"),
        "points": float(len(recalls)),
    }
