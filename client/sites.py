"""Where a site's records are, and the examples built from them.

A data directory with sub-directories is a consortium (one site per sub-directory, as the bundled
sample is); without sub-directories it is one site.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pmlm.client.assemble.context import notes_a_prompt_shows
from pmlm.client.examples import Example, build_examples, pregnancies
from pmlm.client.ingest import RecordReader, list_record_files
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Quarantine, Timeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "data" / "sample"
# The sample's small clinics (30 and 50 women) receive phase A without training it: their operators' setting in the
# demo, since a dozen training patients' DP update would mostly add noise to the consortium model (README, #17).
SAMPLE_RECEIVE_ONLY = ("small_clinic_d", "small_clinic_e")


def discover_sites(root: Path) -> dict[str, Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such data directory: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and list_record_files(p)) if root.is_dir() else []
    return {p.name: p for p in subdirs} if subdirs else {root.name or "site": root}


@dataclass(frozen=True)
class SiteLocation:
    site_id: str
    data_dir: Path  # the hospital's records
    site_dir: Path  # what PMLM keeps at the hospital: ledger, keys, artifacts, egress log


def site_location(node_config: dict, run_config: dict) -> SiteLocation:
    """Which hospital a Flower node is, from its node config and the run config.

    In a deployment the SuperNode's node config names it (`data-dir` and `site-dir`, optional `site-id`): the
    site directory holds its ledger and budget, so it never comes from the coordinator's run config (a
    `workdir` it picked would be a fresh ledger with a fresh budget). In simulation the run config's
    `data-root` (a consortium folder) and `workdir` plus the node's `partition-id` pick one hospital.
    """
    workdir = Path(str(run_config.get("workdir", "pmlm-work")))
    if "data-dir" in node_config:
        if "site-dir" not in node_config:
            raise ValueError("this node's config names its data-dir but no site-dir: a hospital's ledger, keys and "
                             "budget live in a directory its own operator names (--node-config \"site-dir=...\")")
        data_dir = Path(str(node_config["data-dir"]))
        site_id = str(node_config.get("site-id", data_dir.name))
        return SiteLocation(site_id, data_dir, Path(str(node_config["site-dir"])))
    if "data-root" not in run_config or "partition-id" not in node_config:
        raise ValueError("cannot tell which hospital this node is: its node config has no data-dir, and the "
                         "run config no data-root (with a partition-id for the node)")
    sites = discover_sites(Path(str(run_config["data-root"])))
    site_id, data_dir = sorted(sites.items())[int(node_config["partition-id"]) % len(sites)]
    return SiteLocation(site_id, data_dir, workdir / "sites" / site_id)


@dataclass
class SiteData:
    name: str
    examples: list[Example] = field(default_factory=list)
    patients: int = 0
    events: int = 0
    pregnancies: int = 0
    quarantined: list[Quarantine] = field(default_factory=list)


def load_site(name: str, path: Path, profile: TaskProfile, keep_timelines: bool = False,
              progress: bool = True) -> tuple[SiteData, list[Timeline]]:
    """Read one site's records into examples; timelines are kept only when asked (memory)."""
    # Examples never carry note text; timelines kept for prompts (client/assemble) need the notes prompts show.
    reader = RecordReader(path, note_text=notes_a_prompt_shows(profile) if keep_timelines else False)
    site = SiteData(name)
    kept: list[Timeline] = []
    bar = tqdm(reader, desc=f"reading {name}", unit=" patients", file=sys.stderr, disable=not progress,
               leave=False)
    for timeline in bar:
        site.patients += 1
        site.events += len(timeline.events)
        site.pregnancies += len(pregnancies(timeline, profile))
        site.examples.extend(build_examples(timeline, profile, site=name))
        if keep_timelines:
            kept.append(timeline)
    site.quarantined = reader.quarantined
    return site, kept
