"""What a pipeline run is asked to do (`pmlm demo` and `pmlm evaluate` fill it from their flags), and the run
config the coordinator's ServerApp receives from it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

# The prompts the guidance evaluation scores: no context, her summary, her predictions, her peers, both (the
# initial prompt), the consortium's DP policy, what the site really uses (its refined policy), and an oracle that
# is told what happened next (the ceiling).
GUIDANCE_VARIANTS = ("general", "summary_only", "self", "peer", "self_peer", "pmlm_consortium", "pmlm", "oracle")


@dataclass
class PipelineOptions:
    data: Path
    workdir: Path
    sites: int = 3
    epsilon: float = 3.0  # per site, whole budget (phase A's cap is half; B and C share what composition leaves)
    delta: float = 1e-5
    max_test_points: int = 40
    points_per_patient: int = 1  # test points scored per test patient (chronic: few test patients, many visits)
    rounds: int = 3
    local_epochs: int = 1
    phase_b_rounds: int = 2
    prototypes: int = 6
    min_count: int = 20
    phase_c_rounds: int = 1  # one release of all its episodes: at a fixed budget, more rounds only add noise
    phase_c_points: int = 24  # the public nominal points a site, which the coordinator's step is normalised by
    phase_c_rate: float = 0.25  # each training patient's chance to take part in a phase C round (~22 at the sample's sites)
    max_tokens: int = 120
    profile: str = "obgyn"
    baselines_trained: bool = True  # centralized and local-only models (non-private) for the table
    llm: dict = field(default_factory=dict)
    progress: bool = True
    variants: tuple = GUIDANCE_VARIANTS  # which prompts the guidance evaluation scores
    curve: tuple = ()  # extra epsilons per site for the privacy-utility curve (each a full federated run)
    refine: bool = True  # each site refines the consortium's prompt policy on its own records (client/refine.py)
    refine_calls: int = 150  # the most LLM requests a site's refinement may make
    # Where each site keeps its LLM response cache: DIR/<site> (so the curve's runs and a later demo reuse it), or
    # None for SITE_DIR/llm_cache. A site's cache holds its own prompts and answers and never leaves it.
    llm_cache: Path | None = None
    # Sites whose policy receives phase A without training it (their operators' choice: client/site_policy.py).
    receive_only: tuple = ()
    engine: str = "in-process"  # or "deployment": a local SuperLink and SuperNodes (TLS, node auth) on loopback


class PipelineError(RuntimeError):
    """The federated run did not complete; the message says which step failed and where its logs are."""


def progress_bar(desc: str, total: int, opts: PipelineOptions):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not opts.progress, leave=False)


def run_config(opts: PipelineOptions) -> dict:
    return {
        "num-server-rounds": opts.rounds, "local-epochs": opts.local_epochs, "epsilon": opts.epsilon,
        "delta": opts.delta, "profile": opts.profile,
        "workdir": str(opts.workdir), "phases": "abc", "evaluate-each-round": False,
        "phase-b-rounds": opts.phase_b_rounds, "phase-b-prototypes": opts.prototypes,
        "phase-b-min-count": opts.min_count, "phase-c-rounds": opts.phase_c_rounds,
        "phase-c-points": opts.phase_c_points, "phase-c-rate": opts.phase_c_rate,
        "phase-c-max-tokens": opts.max_tokens,
    }


def site_llm_settings(opts: PipelineOptions, site: str) -> dict:
    """A site's LLM settings as its site.json and node config carry them: the run's LLM, the site's own cache."""
    return {**opts.llm, "cache_dir": str(opts.llm_cache / site)} if opts.llm_cache else dict(opts.llm)
