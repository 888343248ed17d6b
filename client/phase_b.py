"""One hospital's side of phase B, Flower-free: embed local patients with the global model, release noisy
per-prototype statistics, keep the resulting global peer profiles.

Embeddings are computed and kept here; the ClientApp only turns messages into these calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pmlm.client.advice import PEER_PROFILES
from pmlm.client.examples import Example
from pmlm.client.peers import PEER_SPLITS, NoisyRelease, PhaseBConfig, PhaseBSite
from pmlm.common.atomic import write_atomic
from pmlm.common.peer_profiles import PeerProfiles
from pmlm.common.privacy import BudgetConfig, SiteLedger


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
        from pmlm.client.phase_a import load_global_model

        self.site_id, self.site_dir, self.run_id = site_id, Path(site_dir), run_id
        model, encoder, _ = load_global_model(self.site_dir)
        chosen = [ex for ex in examples if ex.split in PEER_SPLITS]
        ledger = SiteLedger(self.site_dir, site_id, budget)
        concepts = [c.id for c in encoder.profile.concepts]
        self.site = PhaseBSite(ledger, chosen, embed_examples(model, encoder, chosen), concepts, config, run_id,
                               phase_cap=phase_cap)
        # The noise is calibrated once per run; a node that runs each message in a fresh process (the
        # Deployment Engine) must find the same plan, not re-calibrate on what is left after round 1.
        self.plan_path = self.site_dir / "phase_b" / f"plan-{run_id}.json"
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
    return write_atomic(Path(site_dir) / phase / "current.json", json.dumps(manifest, indent=2))
