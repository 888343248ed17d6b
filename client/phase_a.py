"""One hospital's side of phase A: its examples, its privacy ledger, one local round, the stored global model.

Flower-free on purpose (client_app.py turns messages into these calls), so the same code runs under
Flower's simulation engine, the in-process test harness and a real deployment.

Privacy: the site's own policy (client/site_policy.py) fixes the ledger's budget; the run config can
only ask for less, and a run outside the policy (non-private, more epsilon, another delta) is refused
before anything is trained. The noise multiplier is calibrated once per run from what is left of the
phase-A cap for the whole planned run (rounds x local steps), with the sampling rate and step count
from public numbers (never the site's patient count). Each local round is priced, trained and
recorded under one ledger lock (`SiteLedger.release`): a round that does not fit is refused (and the
refusal recorded) before any training, and the entry is written before the weights are returned.
A site killed while training has no entry for that round; one killed after recording keeps an entry
for weights that never left (over-counted, never under-counted). A round of a run asked for again is
refused by the ledger (`AlreadyReleased`) before anything is trained: it is never charged twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import RDPAccountant

from pmlm.client.examples import Example
from pmlm.client.features import FeatureEncoder, PatientDataset
from pmlm.client.ingest import list_record_files
from pmlm.client.site_policy import SitePolicy
from pmlm.client.sites import load_site
from pmlm.client.train import TrainSettings, model_state, predict, ranking_metrics, train_local
from pmlm.common.atomic import write_atomic
from pmlm.common.model import NextEventRecommender, RecommenderConfig
from pmlm.common.phase_a import PHASE, PhaseAConfig, dp_plan, new_model, planned_releases
from pmlm.common.privacy.events import DpSgd
from pmlm.common.privacy.ledger import SiteLedger
from pmlm.common.profiles import TaskProfile, load_profile
from pmlm.common.site_layout import MODEL_DIR, current_manifest, plan_file

# dp-accounting's RDP logs a warning for every order it skips at large sampling rates; the result is valid.
logging.getLogger("absl").setLevel(logging.ERROR)

NOISE_SOURCE = "torch default generator, seeded from os.urandom (Opacus secure_mode off: torchcsprng unavailable)"


def train_settings(cfg: PhaseAConfig, seed: int) -> TrainSettings:
    """One local round's settings: DP-SGD (plain SGD, clipped) when private, else the configured optimizer."""
    settings = TrainSettings(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             optimizer=cfg.optimizer, points_per_patient=cfg.points_per_patient,
                             clipping_norm=cfg.patient_clip, sampling_rate=cfg.sampling_rate, seed=seed)
    if cfg.private:
        settings.optimizer, settings.lr = "sgd", cfg.dp_lr
    return settings


# Reading records is the slow part; a site process reads its directory once per profile, and again only when
# its record files change (a long-lived site worker must see the next export, not keep its first read).
_EXAMPLES: dict[tuple[str, str], tuple[tuple, list[Example]]] = {}
_READING = threading.Lock()  # the site worker reads ahead in a thread while a message may ask for the same records


def records_now(data_dir: Path) -> tuple:
    """The site's record files as they are now: (path, size, modification time) of each."""
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in list_record_files(Path(data_dir)) for st in [p.stat()])


def site_examples(data_dir: Path, site_id: str, profile: TaskProfile) -> list[Example]:
    key = (str(Path(data_dir).resolve()), profile.name)
    with _READING:
        files = records_now(data_dir)  # before reading: a file changed while it is read is read again next time
        kept = _EXAMPLES.get(key)
        if kept is None or kept[0] != files:
            site, _ = load_site(site_id, Path(data_dir), profile, progress=False)
            _EXAMPLES[key] = (files, site.examples)
        return _EXAMPLES[key][1]


def keep_site_examples(data_dir: Path, profile: TaskProfile, examples: list[Example]) -> None:
    """Examples this process has already read from `data_dir` (the in-process pipeline reads every site once for
    its evaluation): the site's handlers then use them instead of parsing the same records again."""
    _EXAMPLES[(str(Path(data_dir).resolve()), profile.name)] = (records_now(data_dir), examples)


class SitePhaseA:
    def __init__(self, site_id: str, data_dir: Path, site_dir: Path, cfg: PhaseAConfig,
                 examples: list[Example] | None = None, policy: SitePolicy | None = None):
        self.site_id, self.site_dir, self.cfg = site_id, Path(site_dir), cfg
        self.policy = policy or SitePolicy.load(self.site_dir)
        # Raises PolicyRefusal for a run that asks for more than the policy allows (before any record is read).
        self.caps = self.policy.run_caps(cfg.phase_a_epsilon, cfg.epsilon_total, cfg.delta)
        self.profile = load_profile(cfg.profile)
        self.examples = examples if examples is not None else site_examples(data_dir, site_id, self.profile)
        self.encoder = FeatureEncoder(self.profile, cfg.max_history)
        self.train_set = PatientDataset([e for e in self.examples if e.split == "train"], self.encoder,
                                        cfg.points_per_patient, seed=secrets.randbits(32))

    @property
    def private(self) -> bool:
        return bool(self.caps)  # empty only for a non-private run the site's policy allows

    def ledger(self, run_id: str) -> SiteLedger:
        return SiteLedger(self.site_dir, self.site_id, self.policy.budget(), run_id=run_id)

    def model_from(self, weights: dict[str, torch.Tensor]) -> NextEventRecommender:
        model = new_model(self.cfg, self.profile)
        model.load_state_dict(weights)
        return model

    def plan(self, run_id: str, state: dict[str, Any]) -> dict[str, Any]:
        """The run's DP-SGD plan, calibrated on the first round and kept (in `state`) for the others."""
        if state.get("run") == run_id and "noise_multiplier" in state:
            return state
        q, steps = dp_plan(self.cfg.sampling_rate, self.cfg.local_epochs)
        ledger = self.ledger(run_id)
        sigma = ledger.calibrate(PHASE, lambda s: planned_releases(self.cfg, s), phase_cap=self.caps[PHASE],
                                 near=self.cfg.noise_guess or None)
        plan = {"run": run_id, "noise_multiplier": sigma, "sampling_rate": q, "steps_per_round": steps,
                "rounds": self.cfg.rounds, "patient_clip": self.cfg.patient_clip,
                "phase_epsilon_cap": self.caps[PHASE], "opacus_history": []}
        write_atomic(self.site_dir / plan_file(PHASE, run_id), json.dumps(plan, indent=2))
        state.clear()
        state.update(plan)
        return state

    def train_round(self, weights: dict[str, torch.Tensor], server_round: int, run_id: str,
                    state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One local round from the global `weights`; returns the new weights and site-level aggregates.

        `state` is the node's memory across rounds of this run (the calibrated plan, Opacus history).
        """
        model = self.model_from(weights)
        settings = train_settings(self.cfg, seed=secrets.randbits(63))
        # Every site weighs the same in FedAvg: its patient count is not public (see the README's threat model).
        metrics: dict[str, float] = {"num-examples": 1.0}
        if not self.private:
            report = train_local(model, self.train_set, settings)
            metrics["train-loss"] = report.loss  # a non-private run (the site's own benchmark) hides nothing
        else:
            plan = self.plan(run_id, state)
            settings.noise_multiplier = plan["noise_multiplier"]
            planned = DpSgd(plan["noise_multiplier"], plan["sampling_rate"], plan["steps_per_round"],
                            plan["patient_clip"])
            population = self.policy.population_size(len(self.train_set))

            def train_with_noise():  # under the ledger's lock: priced before, recorded right after
                report = train_local(model, self.train_set, settings, opacus_history=plan["opacus_history"])
                used = DpSgd(report.noise_multiplier, report.sample_rate, report.steps, report.clipping_norm)
                if used != planned:  # the ledger must describe exactly what Opacus did
                    raise RuntimeError(f"DP-SGD ran {used}, the ledger priced {planned}; nothing is released")
                return report

            # Opacus's own accountant after this round: a cross-check known before training (public numbers only).
            history = [*plan["opacus_history"], [planned.noise_multiplier, planned.sampling_rate, planned.steps]]
            report, entry = self.ledger(run_id).release(
                PHASE, planned, train_with_noise, round=server_round, population_size=population,
                noise_source=NOISE_SOURCE,
                extra={"opacus_rdp_epsilon": _opacus_epsilon(history, self.policy.delta),
                       "local_epochs": self.cfg.local_epochs, "sampling": "poisson at a public rate"})
            state["opacus_history"] = report.opacus_history
            metrics.update({"epsilon": entry["phase_epsilon"], "noise-multiplier": report.noise_multiplier})
        metrics["local-steps"] = float(report.steps)
        return model_state(model), metrics

    def evaluate(self, weights: dict[str, torch.Tensor], split: str = "val") -> dict[str, float]:
        """Exact metrics of `weights` on a split: on-site use only; the ClientApp asks the policy first."""
        examples = [e for e in self.examples if e.split == split and e.targets]
        model = self.model_from(weights)
        metrics = ranking_metrics(predict(model, examples, self.encoder), examples, self.encoder)
        return {"num-examples": float(len(examples)), **{k: v for k, v in metrics.items() if k != "points"}}

    def store_global(self, weights: dict[str, torch.Tensor], server_round: int, run_id: str) -> Path:
        """Keep the released global model with the ledger entry of this site's last release that produced it."""
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        blob = buffer.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        folder = self.site_dir / MODEL_DIR / f"{run_id}-r{server_round:03d}"
        write_atomic(folder / "model.pt", blob)
        release = None
        if self.private:
            entries = [e for e in self.ledger(run_id).entries()
                       if e["kind"] == "release" and e["phase"] == PHASE and e["run_id"] == run_id
                       and e["round"] == server_round]
            if entries:
                e = entries[-1]
                release = {"seq": e["seq"], "signature": e["signature"], "epsilon": e["epsilon"],
                           "phase_epsilon": e["phase_epsilon"], "mechanism": e["mechanism"]}
        manifest = {
            "phase": PHASE, "run_id": run_id, "round": server_round, "site_id": self.site_id,
            "model_sha256": digest, "profile": self.profile.name, "model_config": self.cfg.model_config(self.profile).to_dict(),
            "private": self.private, "ledger_release": release,
            "trained_here": self.policy.phase_a_train,  # false: received from the consortium, never trained here
        }
        write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2))
        write_atomic(self.site_dir / current_manifest(PHASE),
                     json.dumps({"path": str(folder.relative_to(self.site_dir)), **manifest}, indent=2))
        return folder


def _opacus_epsilon(history: list, delta: float) -> float:
    """Opacus's own RDP epsilon for the site's history: a cross-check, the ledger is the authority."""
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta)) if history else 0.0


def load_global_model(site_dir: Path) -> tuple[NextEventRecommender, FeatureEncoder, dict[str, Any]]:
    """The site's current phase-A global model, its feature encoder and manifest (for phase B, self features)."""
    site_dir = Path(site_dir)
    current = json.loads((site_dir / current_manifest(PHASE)).read_text())
    folder = site_dir / current["path"]
    return load_model_file(folder / "model.pt", json.loads((folder / "manifest.json").read_text()))


def load_model_file(path: Path, manifest: dict[str, Any]) -> tuple[NextEventRecommender, FeatureEncoder, dict[str, Any]]:
    """A stored recommender checked against its manifest's sha256, built from the manifest's config and profile."""
    blob = Path(path).read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["model_sha256"]:
        raise ValueError(f"{path} does not match its manifest's sha256")
    model = NextEventRecommender(RecommenderConfig.from_dict(manifest["model_config"]))
    model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
    model.eval()
    profile = load_profile(manifest["profile"])
    return model, FeatureEncoder(profile, model.cfg.max_history), manifest
