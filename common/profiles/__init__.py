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


@dataclass(frozen=True)
class StageRule:
    """Concepts that cannot happen within the horizon after a prediction point at one of `stages` (from
    `from_gestational_week` on, when set), and why, in words a clinician reads."""

    stages: frozenset[str]
    concepts: frozenset[str]
    why: str
    from_gestational_week: float | None = None


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
    # Stages of a pregnancy (prenatal, intrapartum, postpartum) and what cannot follow each; empty: no stages.
    stage_labels: dict[str, str] = field(default_factory=dict)
    intrapartum_points: frozenset[str] = frozenset()
    stage_enders: dict[str, frozenset[str]] = field(default_factory=dict)  # stage -> events that begin it
    stage_rules: tuple[StageRule, ...] = ()
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

    def stage_at(self, point: str, gestational_week: float | None, weeks_postpartum: float | None) -> str | None:
        """Her stage at a prediction point, from her record: postpartum after the pregnancy ended, intrapartum at
        a delivery admission, prenatal while pregnant; None when the profile has no stages or she is neither.
        (An event of `stage_enders` since her pregnancy began moves her on: client.assemble.stage.her_stage.)"""
        if not self.stage_labels:
            return None
        if weeks_postpartum is not None:
            return "postpartum"
        if gestational_week is not None:
            return "intrapartum" if point in self.intrapartum_points else "prenatal"
        return None

    def impossible_at(self, stage: str | None, gestational_week: float | None = None) -> dict[str, str]:
        """{concept: why} of the concepts that cannot happen within the horizon after a point at `stage`."""
        out: dict[str, str] = {}
        for rule in self.stage_rules:
            if stage not in rule.stages:
                continue
            if rule.from_gestational_week is not None and (gestational_week is None
                                                           or gestational_week < rule.from_gestational_week):
                continue
            for concept in sorted(rule.concepts):
                out.setdefault(concept, rule.why)
        return out

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
    stages = raw.get("stages") or {}
    rules = tuple(StageRule(frozenset(r["stages"]), frozenset(r["concepts"]), r["why"],
                            r.get("from_gestational_week")) for r in stages.get("impossible", []))
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
        stage_labels=dict(stages.get("labels", {})),
        intrapartum_points=frozenset(stages.get("intrapartum_points", [])),
        stage_enders={stage: frozenset(concepts) for stage, concepts in stages.get("ended_by", {}).items()},
        stage_rules=rules,
    )
