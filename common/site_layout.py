"""The site directory's layout: where a hospital keeps what it computes, signs and logs (SITE_DIR, the SuperNode's
`site-dir`). Every path is relative to SITE_DIR; every other module asks this one for it.

    site.json                        the site's settings and privacy policy (client/site_config.py)
    keys/site_ed25519.key[.pub]      the site's signing key (the ledger's entries)
    keys/sampling.key                the key of the site's Poisson sampling PRF (client/sampling.py)
    ledger/privacy_ledger.jsonl      the signed privacy ledger (common/privacy/ledger.py)
    ledger/releases/                 kept releases, re-sent on a retry (common/privacy/kept.py)
    phase_a/plan-RUN.json            a run's calibrated plan (likewise phase_b/, phase_c/)
    phase_a/models/RUN-rNNN/         the released global recommender: model.pt, manifest.json
    phase_a/current.json             which phase-A artifact is current (likewise phase_b/, phase_c/)
    phase_b/peer_profiles.npz        the global peer profiles
    phase_c/policy.pt                the global prompt policy (the consortium's, DP)
    on_site/recommender/manifest.json  the site-adapted recommender: the choice made on validation and the
                                     consortium model it adapts (client/adapt.py); model-SHA.pt beside it, never sent
    on_site/prompt_policy.pt         the site-refined prompt policy: local RL from the global one, never sent
    on_site/prompt_refinement.json   the last refinement's decision and validation figures (client/refine.py)
    llm_cache/llm_responses.sqlite   the site's LLM answers, keyed by model and request (client/llm/cache.py)
    egress.jsonl                     every message that left the site (client/egress.py)
    audit/access_log.jsonl           every call of the on-site gRPC services (client/access_log.py)
    audit/membership.json            the membership-inference audit (client/membership_audit.py)
"""

from __future__ import annotations

from pathlib import Path

SITE_JSON = Path("site.json")
SITE_KEY_PATH = Path("keys") / "site_ed25519.key"  # its .pub beside it
SAMPLING_KEY_PATH = Path("keys") / "sampling.key"
LEDGER_PATH = Path("ledger") / "privacy_ledger.jsonl"
KEPT_DIR = Path("ledger") / "releases"
MODEL_DIR = Path("phase_a") / "models"
PEER_PROFILES = Path("phase_b") / "peer_profiles"  # numpy adds .npz
POLICY = Path("phase_c") / "policy.pt"
# Site-only artifacts: computed from the site's own records for its own use, never sent, no ledger entry.
SITE_RECOMMENDER_DIR = Path("on_site") / "recommender"  # manifest.json and the model file it names
SITE_POLICY = Path("on_site") / "prompt_policy.pt"
SITE_REFINEMENT = Path("on_site") / "prompt_refinement.json"
LLM_CACHE_DIR = Path("llm_cache")
EGRESS_LOG = Path("egress.jsonl")
ACCESS_LOG = Path("audit") / "access_log.jsonl"
MEMBERSHIP_JSON = Path("audit") / "membership.json"


def current_manifest(phase: str) -> Path:
    """The manifest naming a phase's current artifact and the ledger releases that built it."""
    return Path(phase) / "current.json"


def plan_file(phase: str, run_id: str) -> Path:
    """A run's calibrated noise plan for a phase: a node that runs each message in a fresh process finds it."""
    return Path(phase) / f"plan-{run_id}.json"
