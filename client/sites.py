"""Where a site's records are, and the examples built from them.

A data directory with sub-directories is a consortium (one site per sub-directory, as the bundled
sample is); without sub-directories it is one site.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pmlm.client.examples import Example, build_examples, pregnancies
from pmlm.client.ingest import RecordReader, list_record_files
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Quarantine, Timeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "data" / "sample"


def discover_sites(root: Path) -> dict[str, Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such data directory: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and list_record_files(p)) if root.is_dir() else []
    return {p.name: p for p in subdirs} if subdirs else {root.name or "site": root}


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
    reader = RecordReader(path)
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
