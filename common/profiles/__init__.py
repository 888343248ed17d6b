"""Task profiles: which encounters are prediction points, the horizon, the target vocabulary, the risks.

A profile is a data file (``<name>.json`` beside this module, built by scripts/build_profiles.py from
public sources); switching the clinical domain means switching the file, not the code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEFAULT_PROFILE = "obgyn"


@dataclass(frozen=True)
class Concept:
    id: str
    kind: str
    name: str
    display: str
    synonyms: tuple[str, ...]
    obgyn: bool


@dataclass
class TaskProfile:
    name: str
    title: str
    horizon_days: int
    prediction_points: frozenset[str]
    risks: frozenset[str]
    target_kinds: frozenset[str]
    concepts: list[Concept]
    pregnancy_start: frozenset[str] = frozenset()
    first_visit: str | None = None
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {c.id: i for i, c in enumerate(self.concepts)}

    def __len__(self) -> int:
        return len(self.concepts)

    def is_target(self, concept: str, kind: str) -> bool:
        return kind in self.target_kinds and concept in self.index

    def name_of(self, concept: str) -> str:
        i = self.index.get(concept)
        return self.concepts[i].name if i is not None else concept

    @property
    def risk_ids(self) -> list[str]:
        return sorted(self.risks)

    def mention_patterns(self) -> dict[str, re.Pattern]:
        """Per concept, a regex matching its name or any synonym as whole words (for scoring answers)."""
        patterns = {}
        for c in self.concepts:
            terms = sorted({c.name.lower(), *c.synonyms}, key=len, reverse=True)
            patterns[c.id] = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms if t) + r")\b", re.IGNORECASE)
        return patterns


def available_profiles() -> list[str]:
    folder = resources.files(__name__)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> TaskProfile:
    """Load a bundled profile by name (``obgyn``, ``chronic``) or any profile file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        raw = json.loads(path.read_text())
    else:
        if name_or_path not in available_profiles():
            raise ValueError(f"unknown task profile {name_or_path!r}; bundled: {', '.join(available_profiles())}")
        raw = json.loads((resources.files(__name__) / f"{name_or_path}.json").read_text())
    concepts = [Concept(v["id"], v["kind"], v["name"], v["display"], tuple(v["synonyms"]), bool(v["obgyn"]))
                for v in raw["vocabulary"]]
    pregnancy = raw.get("pregnancy") or {}
    return TaskProfile(
        name=raw["name"],
        title=raw["title"],
        horizon_days=int(raw["horizon_days"]),
        prediction_points=frozenset(raw["prediction_points"]),
        risks=frozenset(raw["risks"]),
        target_kinds=frozenset(raw["target_kinds"]),
        concepts=concepts,
        pregnancy_start=frozenset(pregnancy.get("start", [])),
        first_visit=pregnancy.get("first_visit"),
    )
