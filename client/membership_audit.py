"""The on-site membership-inference audit of a site's released artifacts (`pmlm audit membership`).

Members and non-members are the site's own patients, so this runs at the site, next to its records:

* the phase-A global model — members: the patients of the training split (the only ones DP-SGD saw);
  non-members: the held-out validation and test splits;
* the phase-B peer profiles — members: the training and validation splits (phase B uses every prediction
  point of their patients); non-members: the test split.

Each artifact is tied to the signed ledger releases that produced it; their composition gives the
artifact's (ε, δ) and so the bound on any attack (common/privacy/membership.py). The profiles are
computed from embeddings of the phase-A model, so their guarantee composes phase A's releases of the
same run with phase B's. The result, SITE_DIR/audit/membership.json, holds aggregate figures only
(counts, advantages, AUCs): it is safe to hand to an auditor, and `pmlm audit report` shows it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmlm.client.examples import Example
from pmlm.client.phase_b import PEER_SPLITS, assign, target_columns
from pmlm.client.phase_a import load_global_model
from pmlm.client.phase_b import embed_examples
from pmlm.client.site_config import SiteConfig
from pmlm.client.sites import load_site
from pmlm.common.atomic import write_atomic
from pmlm.common.model import NextEventRecommender
from pmlm.common.peer_profiles import PeerProfiles, centred
from pmlm.common.privacy.ledger import LedgerReplay, verify_ledger
from pmlm.common.privacy.membership import (
    FORMAT,
    MIN_GROUP,
    RESAMPLES,
    advantage_bound,
    composed_epsilon,
    mean_by_group,
    measure,
    point_losses,
    profile_alignment,
    tied_releases,
    verdict,
)
from pmlm.common.privacy.signing import load_public_key, public_path
from pmlm.common.site_layout import LEDGER_PATH, PEER_PROFILES, SITE_KEY_PATH, current_manifest

PRIVACY_UNIT = "patient-in-site"
REFERENCE_SEED = 0  # the untrained reference model is public: any fixed seed will do


class MembershipAuditError(ValueError):
    """The audit cannot run on this site directory (no verified ledger, no artifact)."""


def site_ledger(site_dir: Path) -> LedgerReplay | None:
    """The site's verified ledger; None when it has none (it released nothing under DP)."""
    path = site_dir / LEDGER_PATH
    if not path.is_file():
        return None
    replay = verify_ledger(path, load_public_key(public_path(site_dir / SITE_KEY_PATH)))
    if replay.problems:
        raise MembershipAuditError(f"{path} does not verify ({replay.problems[0]}); run `pmlm audit verify` first")
    return replay


def _releases(replay: LedgerReplay | None, phase: str, run_id: str, up_to_round: int | None = None) -> list[dict]:
    return [e for e in (replay.entries if replay else [])
            if e.get("kind") == "release" and e.get("phase") == phase and e.get("run_id") == run_id
            and e.get("privacy_unit") == PRIVACY_UNIT
            and (up_to_round is None or (e.get("round") is not None and e["round"] <= up_to_round))]


def _artifact(name: str, path: Path, site_dir: Path, sha256: str, run_id: str, releases: list[dict],
              replay: LedgerReplay | None, attacks: list[tuple[str, np.ndarray, np.ndarray]], resamples: int,
              note: str = "") -> dict[str, Any]:
    delta = replay.budget.delta if replay else None
    epsilon = composed_epsilon(releases, delta, replay.settings) if releases else None
    bound = advantage_bound(epsilon, delta) if epsilon is not None else None
    measured = []
    for attack, members, non_members in attacks:
        result = measure(attack, members, non_members, resamples=resamples).to_dict()
        result["verdict"], result["consistent"] = verdict(result, bound)
        measured.append(result)
    return {"artifact": name, "path": str(path.relative_to(site_dir)), "sha256": sha256, "run_id": run_id,
            "ledger_releases": [{"seq": e["seq"], "signature": e["signature"]} for e in releases],
            "epsilon": epsilon, "delta": delta, "bound": bound, "attacks": measured, "note": note}


def _by_patient(examples: list[Example], splits: tuple[str, ...]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.split in splits:
            out.setdefault(ex.patient_id, []).append(ex)
    return out


def _patient_losses(models: list[torch.nn.Module], encoder, patients: dict[str, list[Example]]) -> list[np.ndarray]:
    """Each patient's mean loss over all her prediction points, under each model (the phase-A training loss)."""
    examples = [ex for exs in patients.values() for ex in exs]
    group = np.repeat(np.arange(len(patients)), [len(exs) for exs in patients.values()])
    history, point, targets = encoder.encode(examples)
    return [mean_by_group(point_losses(m, history, point, targets), group, len(patients)) for m in models]


def audit_model(site_dir: Path, replay: LedgerReplay | None, examples: list[Example], loaded: tuple,
                resamples: int) -> dict[str, Any]:
    model, encoder, manifest = loaded
    with torch.random.fork_rng():
        torch.manual_seed(REFERENCE_SEED)
        reference = NextEventRecommender(model.cfg)
    members, non_members = _by_patient(examples, ("train",)), _by_patient(examples, ("val", "test"))
    attacks, note = [], ""
    if min(len(members), len(non_members)) >= MIN_GROUP:
        m_loss, m_ref = _patient_losses([model, reference], encoder, members)
        n_loss, n_ref = _patient_losses([model, reference], encoder, non_members)
        attacks = [("loss threshold", -m_loss, -n_loss), ("calibrated loss", m_ref - m_loss, n_ref - n_loss)]
    else:
        note = f"too few patients to attack ({len(members)} members, {len(non_members)} held out; need {MIN_GROUP})"
    releases = _releases(replay, "phase_a", manifest["run_id"], manifest["round"]) if manifest.get("private") else []
    if not manifest.get("private"):
        note = "; ".join(filter(None, [note, "trained without DP: no ledger release, no bound"]))
    elif not releases:
        note = "; ".join(filter(None, [note, "trained with DP, but the site's ledger holds none of its releases"]))
    folder = site_dir / json.loads((site_dir / current_manifest("phase_a")).read_text())["path"]
    return _artifact("phase A global model", folder / "model.pt", site_dir, manifest["model_sha256"],
                     manifest["run_id"], releases, replay, attacks, resamples, note)


def audit_peer_profiles(site_dir: Path, replay: LedgerReplay | None, examples: list[Example], loaded: tuple,
                        resamples: int) -> dict[str, Any] | None:
    path = site_dir / PEER_PROFILES
    manifest_path = site_dir / current_manifest("phase_b")
    if not path.with_suffix(".npz").is_file() or not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    profiles = PeerProfiles.load(path)
    model, encoder, model_manifest = loaded
    run_id = manifest["run_id"]
    note = "" if model_manifest["run_id"] == run_id else (
        f"the stored model is from run {model_manifest['run_id']}, the profiles from run {run_id}: the attack's "
        f"embeddings may not be the ones phase B used")
    # Phase B uses every prediction point of a member: score each point against its prototype as phase B
    # assigned it (centred embedding), and each patient by the mean over her points.
    scores = []
    for splits in (PEER_SPLITS, ("test",)):
        chosen = [ex for ex in examples if ex.split in splits]
        patient = np.unique([ex.patient_id for ex in chosen], return_inverse=True)[1].reshape(-1)
        prototype = assign(centred(embed_examples(model, encoder, chosen), profiles.centre), profiles.centroids)
        targets = np.zeros((len(chosen), len(profiles.concepts)))
        for row, columns in enumerate(target_columns(chosen, profiles.concepts)):
            targets[row, columns] = 1.0
        points = profile_alignment(prototype, targets, profiles.rates, profiles.counts, profiles.suppressed)
        scores.append(mean_by_group(points, patient, int(patient.max()) + 1 if len(patient) else 0))
    attacks = []
    if min(len(s) for s in scores) >= MIN_GROUP:
        attacks = [("contribution alignment", scores[0], scores[1])]
    else:
        note = "; ".join(filter(None, [note, f"too few patients to attack ({len(scores[0])} members, "
                                             f"{len(scores[1])} held out; need {MIN_GROUP})"]))
    phase_b, problems = tied_releases(replay.entries if replay else [], manifest.get("ledger_releases", []))
    if problems:
        note = "; ".join(filter(None, [note, *problems]))
    releases = _releases(replay, "phase_a", run_id) + phase_b
    digest = hashlib.sha256(path.with_suffix(".npz").read_bytes()).hexdigest()
    return _artifact("phase B peer profiles", path.with_suffix(".npz"), site_dir, digest, run_id, releases, replay,
                     attacks, resamples, note)


def audit_site(site_dir: Path, data_dir: Path | None = None, *, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Attack every released artifact of the site with its own patients; the JSON `pmlm audit report` shows."""
    site_dir = Path(site_dir)
    config = SiteConfig.load(site_dir)
    replay = site_ledger(site_dir)
    if not (site_dir / current_manifest("phase_a")).is_file():
        raise MembershipAuditError(f"{site_dir} holds no phase-A global model (phase_a/current.json) to audit")
    loaded = load_global_model(site_dir)
    site, _ = load_site(config.site_id, Path(data_dir or config.data_dir), loaded[1].profile, progress=False)
    artifacts = [audit_model(site_dir, replay, site.examples, loaded, resamples)]
    profiles = audit_peer_profiles(site_dir, replay, site.examples, loaded, resamples)
    if profiles is not None:
        artifacts.append(profiles)
    return {"format": FORMAT, "site_id": config.site_id, "privacy_unit": PRIVACY_UNIT,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "patients": site.patients, "resamples": resamples, "artifacts": artifacts}


def write_audit(result: dict[str, Any], path: Path) -> Path:
    return write_atomic(path, json.dumps(result, indent=2) + "\n")
