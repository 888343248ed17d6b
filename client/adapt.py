"""On-site adaptation of the consortium's recommender: the site's own fine-tuned version, used only at the site.

After phase A every site holds the consortium's DP recommender. `adapt_recommender` fine-tunes a copy on the
site's training split (non-private Adam), scores every epoch on the site's validation split, and keeps the
candidate that validation Recall@5 (then NDCG@5) prefers among:

    the consortium model itself               (blend 0)
    logit blends w * fine-tuned + (1 - w) * consortium, at w in `AdaptSettings.blends`
    the best fine-tuned epoch                 (blend 1)

Ties go to the candidate nearer the consortium model, so a site whose validation points do not prefer its own
version keeps the consortium's. Early stopping is a choice among checkpoints: every epoch is run, so the time
the site takes does not depend on which epoch its validation preferred. The recommender's logits are linear in
its weights (a constant prior plus embedding lookups), so a logit blend is itself one recommender with blended
weights: the artifact is one model in the consortium model's format. `site_recommender` is its loader: the
adapted model if the site has one for its current consortium model, else the consortium model.

Privacy: nothing here is sent and nothing is charged to the ledger, and that is sound.
- The consortium model is a DP release; what the site computes from it together with its own records is
  post-processing as far as the release is concerned: it adds nothing to what the coordinator or another
  site can learn, because none of it leaves. The artifact lives under SITE_DIR/on_site/recommender
  (common/site_layout.py) and no Flower reply carries it; the reply of the message that triggers it
  (query.store_model) is the same constant acknowledgement as before, so the egress log shows no new field.
- The adapted model is trained on the site's records without DP, so it memorises them as any local model
  would. That is the hospital's own data used inside the hospital: the patients' protection against the
  coordinator and the other sites is unchanged (the ledger's epsilon still bounds everything that left), and
  on-site use is governed by the hospital's normal access controls (`pmlm serve` admits only the site's own
  certificate holders and logs every call).
- Her prompt's predicted next events come from the adapted model, so an LLM endpoint outside the hospital (a
  site that opts in to one) receives a non-DP function of the site's records: her top predictions and their
  probabilities. The embedded LLM runs inside the hospital.
- Phase B's embeddings, phase C's policy state and peer matching keep using the consortium model: prototypes
  and policies were learned in its embedding space, shared by every site. The adapted model only ranks the
  patient's own next events for her prompt.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmlm.client.examples import Example
from pmlm.client.features import FeatureEncoder, PatientDataset
from pmlm.client.phase_a import load_global_model, load_model_file
from pmlm.client.train import TrainSettings, point_scores, train_local
from pmlm.common.atomic import write_atomic
from pmlm.common.model import NextEventRecommender
from pmlm.common.site_layout import SITE_RECOMMENDER_DIR

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONSORTIUM, FINE_TUNED, BLEND = "consortium", "fine_tuned", "blend"


@dataclass
class AdaptSettings:
    epochs: int = 8  # fine-tuning epochs, all run; validation picks the checkpoint
    lr: float = 0.3  # Adam, non-private, as a site training alone
    batch_size: int = 50
    points_per_patient: int = 32
    blends: tuple[float, ...] = (0.25, 0.5, 0.75)  # share of the fine-tuned logits in the blended candidates
    min_val_points: int = 10  # fewer validation points with targets: keep the consortium model (too little to choose on)
    k: int = 5
    seed: int = 0


@dataclass
class AdaptResult:
    choice: str  # CONSORTIUM, FINE_TUNED or BLEND
    blend: float  # share of the fine-tuned model's logits: 0 consortium, 1 fine-tuned
    epochs: int  # fine-tuning epochs of the fine-tuned checkpoint used (0 when the consortium model is kept)
    validation: dict[str, dict[str, float]]  # candidate -> recall@k, ndcg@k on the site's validation split
    val_points: int
    val_patients: int
    train_patients: int
    adapted_from: str  # sha256 of the consortium model
    reason: str = ""  # why the consortium model was kept without choosing (too few points), if so
    seconds: float = 0.0
    path: Path | None = field(default=None)  # the manifest written

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path) if self.path else None
        return out


def adapt_recommender(site_dir: Path, examples: list[Example], settings: AdaptSettings | None = None,
                      consortium: tuple[NextEventRecommender, FeatureEncoder, dict] | None = None,
                      train_set: PatientDataset | None = None) -> AdaptResult:
    """Fine-tune the site's consortium model on its training split, choose on its validation split, store the
    result at SITE_DIR/on_site/recommender (atomically; the manifest is written last and names the model file).

    `examples`: the site's own examples (all splits; only train and val are read). `consortium`: the
    (model, encoder, manifest) of load_global_model, when the caller has it already. `train_set`: the training
    split of `examples` already encoded (phase A's), used when its encoding is this model's."""
    settings = settings or AdaptSettings()
    started = time.perf_counter()
    site_dir = Path(site_dir)
    base, encoder, base_manifest = consortium or load_global_model(site_dir)
    train = [e for e in examples if e.split == "train"]
    val = [e for e in examples if e.split == "val" and e.targets]
    k = settings.k

    history, point, _ = encoder.encode(val)  # once: every candidate is scored on the same points

    def score(model: NextEventRecommender) -> dict[str, float]:
        recalls, ndcgs, _ = point_scores(_probabilities(model, history, point), val, encoder, k)
        return {f"recall@{k}": float(recalls.mean()) if len(recalls) else float("nan"),
                f"ndcg@{k}": float(ndcgs.mean()) if len(ndcgs) else float("nan")}

    result = AdaptResult(CONSORTIUM, 0.0, 0, {}, len(val), len({e.patient_id for e in val}),
                         len({e.patient_id for e in train}), base_manifest["model_sha256"])
    chosen: dict[str, torch.Tensor] | None = None
    if len(val) < settings.min_val_points or not train:
        result.reason = (f"{len(val)} validation points with targets (fewer than {settings.min_val_points}) and "
                         f"{result.train_patients} training patients: too little to choose on")
    else:
        base_state = {name: w.detach().clone() for name, w in base.state_dict().items()}
        result.validation[CONSORTIUM] = score(base)
        # Fine-tune every epoch and keep each epoch's figures; the best checkpoint is the fine-tuned candidate.
        model = copy.deepcopy(base)
        if train_set is not None and train_set.encoding == (encoder.profile.name, encoder.max_history):
            dataset = train_set.resampled(settings.points_per_patient, settings.seed)
        else:
            dataset = PatientDataset(train, encoder, settings.points_per_patient, seed=settings.seed)
        checkpoints: dict[int, dict[str, torch.Tensor]] = {}

        def after_epoch(epoch: int) -> None:
            result.validation[f"epoch {epoch}"] = score(model)
            checkpoints[epoch] = {name: w.detach().clone() for name, w in model.state_dict().items()}
            model.train()

        train_local(model, dataset, TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size,
                                                  lr=settings.lr, optimizer="adam",
                                                  points_per_patient=settings.points_per_patient, seed=settings.seed),
                    after_epoch=after_epoch)
        best_epoch = max(checkpoints, key=lambda e: (_key(result.validation[f"epoch {e}"], k), -e))
        tuned = checkpoints[best_epoch]
        # Candidates from the consortium model outwards: a later one must be strictly better to win.
        best_key, best_w = _key(result.validation[CONSORTIUM], k), 0.0
        for w in (*sorted(settings.blends), 1.0):
            if w < 1.0:
                blended = _blend(base_state, tuned, w)
                candidate = copy.deepcopy(base)
                candidate.load_state_dict(blended)
                result.validation[f"blend {w:g}"] = score(candidate)
                figures = result.validation[f"blend {w:g}"]
            else:
                figures = result.validation[f"epoch {best_epoch}"]
            if _key(figures, k) > best_key:
                best_key, best_w = _key(figures, k), w
        if best_w == 0:
            result.reason = "validation preferred the consortium model to every fine-tuned or blended candidate"
        else:
            result.choice = FINE_TUNED if best_w == 1.0 else BLEND
            result.blend, result.epochs = best_w, best_epoch
            chosen = tuned if best_w == 1.0 else _blend(base_state, tuned, best_w)
    result.seconds = round(time.perf_counter() - started, 2)
    result.path = _store(site_dir, result, chosen, base_manifest, settings)
    return result


def adapt_after_phase_a(site_dir: Path, examples: list[Example], settings: AdaptSettings | None = None,
                        train_set: PatientDataset | None = None) -> AdaptResult | None:
    """The ClientApp's hook once the consortium model is final and stored: adapt it here, for this site only.

    Whatever happens stays at the site: a failure is logged locally and leaves the consortium model in use
    (site_recommender falls back to it); it never changes the reply that leaves."""
    try:
        result = adapt_recommender(site_dir, examples, settings, train_set=train_set)
    except Exception:  # noqa: BLE001 - the site's own artifact; the consortium model stays the one in use
        log.exception("on-site adaptation of the recommender failed at %s; the consortium model stays in use",
                      site_dir)
        return None
    log.info("on-site adaptation at %s: %s (blend %.2f, %d epochs) in %.1f s", site_dir, result.choice,
             result.blend, result.epochs, result.seconds)
    return result


def site_recommender(site_dir: Path) -> tuple[NextEventRecommender, FeatureEncoder, dict[str, Any]]:
    """The recommender the site uses for its own patients' prompts: (model, encoder, manifest).

    The adapted model when the site has one made from its *current* consortium model; else the consortium
    model itself (no adaptation yet, the consortium model was kept, or it was made from an older consortium
    model). The manifest's `site_only` says which: True for the adapted model."""
    site_dir = Path(site_dir)
    consortium = load_global_model(site_dir)
    folder = site_dir / SITE_RECOMMENDER_DIR
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return (*consortium[:2], {**consortium[2], "site_only": False})
    if manifest.get("adapted_from", {}).get("model_sha256") != consortium[2]["model_sha256"] \
            or not manifest.get("model_file"):
        return (*consortium[:2], {**consortium[2], "site_only": False})
    try:
        return load_model_file(folder / manifest["model_file"], manifest)
    except (FileNotFoundError, ValueError) as exc:  # removed or damaged: the consortium model still serves
        log.warning("the site-adapted recommender cannot be used (%s); using the consortium model", exc)
        return (*consortium[:2], {**consortium[2], "site_only": False})


def read_adaptation(site_dir: Path) -> dict[str, Any] | None:
    """The stored decision (choice, validation figures), or None when the site has not adapted."""
    path = Path(site_dir) / SITE_RECOMMENDER_DIR / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


# -- internals -----------------------------------------------------------------------------------


def _key(figures: dict[str, float], k: int) -> tuple[float, float]:
    return (np.nan_to_num(figures[f"recall@{k}"], nan=-1.0), np.nan_to_num(figures[f"ndcg@{k}"], nan=-1.0))


@torch.no_grad()
def _probabilities(model: NextEventRecommender, history: torch.Tensor, point: torch.Tensor,
                   batch: int = 1024) -> np.ndarray:
    model.eval()
    return np.concatenate([torch.sigmoid(model(history[i:i + batch], point[i:i + batch])).numpy()
                           for i in range(0, len(point), batch)] or [np.zeros((0, model.cfg.n_concepts))])


def _blend(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """Weights whose logits are w * tuned's + (1 - w) * base's (the prior is shared and constant)."""
    return {name: (1.0 - w) * base[name] + w * tuned[name] for name in base}


def _store(site_dir: Path, result: AdaptResult, weights: dict[str, torch.Tensor] | None, base_manifest: dict,
           settings: AdaptSettings) -> Path:
    """The model file (named by its hash) first, the manifest last: a reader sees the old pair or the new one."""
    folder = site_dir / SITE_RECOMMENDER_DIR
    model_file, digest = None, None
    if weights is not None:
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        blob = buffer.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        model_file = f"model-{digest[:16]}.pt"
        write_atomic(folder / model_file, blob)
    manifest = {
        "site_only": True, "never_sent": "computed from this site's records for its own prompts; no ledger entry",
        "model_file": model_file, "model_sha256": digest, "profile": base_manifest["profile"],
        "model_config": base_manifest["model_config"],
        "adapted_from": {key: base_manifest.get(key) for key in ("model_sha256", "run_id", "round")},
        "settings": {**asdict(settings), "blends": list(settings.blends)},
        **{key: value for key, value in result.as_dict().items() if key not in ("path", "adapted_from")},
    }
    path = write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False))
    for stale in folder.glob("model-*.pt"):  # earlier adaptations' files: no manifest names them any more
        if stale.name != model_file:
            stale.unlink(missing_ok=True)
    return path
