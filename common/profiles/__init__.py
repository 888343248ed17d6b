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


@dataclass(frozen=True)
class Scope:
    """Who and when is in scope: only prediction points inside it are examples, for training and evaluation alike.
    Empty: every prediction point of the profile (obgyn's points are all of a pregnancy)."""

    min_age: float | None = None  # her age at the point, in years
    max_age: float | None = None
    last_years: float | None = None  # points within this many years before the record's last event
    encounter_classes: frozenset[str] = frozenset()  # the point's encounter class (AMB, EMER, IMP ...); empty: any
    genders: frozenset[str] = frozenset()  # as the record spells it (female, male); empty: any

    def admits(self, age: float | None, years_before_end: float, encounter_class: str, gender: str) -> bool:
        if self.min_age is not None and (age is None or age < self.min_age):
            return False
        if self.max_age is not None and (age is None or age > self.max_age):
            return False
        if self.last_years is not None and years_before_end > self.last_years:
            return False
        if self.encounter_classes and encounter_class not in self.encounter_classes:
            return False
        return not self.genders or gender.lower() in self.genders

    def describe(self) -> str:
        """The scope in words, e.g. "aged 40 or more, in the last 10 years of the record, AMB encounters"."""
        parts = []
        if self.min_age is not None or self.max_age is not None:
            parts.append(f"aged {self.min_age:g} to {self.max_age:g}" if self.min_age is not None and
                         self.max_age is not None else f"aged {self.min_age:g} or more" if self.min_age is not None
                         else f"aged {self.max_age:g} or less")
        if self.last_years is not None:
            parts.append(f"in the last {self.last_years:g} years of the record")
        if self.encounter_classes:
            parts.append(f"{'/'.join(sorted(self.encounter_classes))} encounters")
        if self.genders:
            parts.append("/".join(sorted(self.genders)))
        return ", ".join(parts)


# Pronouns by the record's gender; a record without one (or another value) is called "the patient".
PRONOUNS = {
    "female": {"subj": "she", "obj": "her", "poss": "her"},
    "male": {"subj": "he", "obj": "him", "poss": "his"},
    "": {"subj": "the patient", "obj": "the patient", "poss": "the patient's"},
}


@dataclass(frozen=True)
class Wording:
    """The words a prompt and a report use for this profile's patients: the role, the question, how her stage
    reads in the summary, what the timing floor's clock is called, and her pronouns. `pronouns` is a gender
    ("female" for a profile whose patients are all women) or "record": from each patient's record."""

    role: str = ("You are a clinical decision-support assistant. You help a clinician plan the care of one "
                 "patient. Be specific and concise.")
    question: str = "What care does this patient need over the next {weeks} weeks?"
    pronouns: str = "record"
    # Summary lines for a profile with stages: "during" takes {week}, "after" {weeks}; "after_recent" none.
    stage_summary: tuple[tuple[str, str], ...] = ()
    clock_label: str = "age band"  # what the timing floor conditions on, for reports
    stage_label: str = "age"  # a report's heading for a point of a profile without stages: "<stage_label> <age>"

    def for_gender(self, gender: str | None) -> dict[str, str]:
        """{subj, obj, poss} for a patient of `gender` under this profile."""
        key = self.pronouns if self.pronouns != "record" else (gender or "").lower()
        return dict(PRONOUNS.get(key, PRONOUNS[""]))

    def summary_line(self, key: str, **values) -> str | None:
        template = dict(self.stage_summary).get(key)
        return template.format(**values) if template else None


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
    # Routine visits of a pregnancy and their schedule: ((until week, interval in days), ...), the last until None.
    scheduled_visits: frozenset[str] = frozenset()
    visit_schedule: tuple[tuple[float | None, float], ...] = ()
    # Stages of a pregnancy (prenatal, intrapartum, postpartum) and what cannot follow each; empty: no stages.
    stage_labels: dict[str, str] = field(default_factory=dict)
    intrapartum_points: frozenset[str] = frozenset()
    stage_enders: dict[str, frozenset[str]] = field(default_factory=dict)  # stage -> events that begin it
    stage_rules: tuple[StageRule, ...] = ()
    scope: Scope = field(default_factory=Scope)
    wording: Wording = field(default_factory=Wording)
    # The timing floor's clock: "pregnancy" (4-week steps since her first prenatal visit), "age" (5-year bands),
    # "since_diagnosis" (years since her first risk condition).
    clock: str = "age"
    generic_terms: frozenset[str] = frozenset()  # names too generic to count as naming a concept in an answer
    # Who `pmlm data generate --profile NAME` simulates: {"gender": "f" | None, "ages": "40-80", "people": "men and
    # women", "modules": [the generator's top-level modules; empty: all of them]}.
    population: dict = field(default_factory=dict)
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
        scheduled_visits=frozenset(pregnancy.get("scheduled_visits", [])),
        visit_schedule=tuple((u, float(d)) for u, d in pregnancy.get("visit_schedule", [])),
        stage_labels=dict(stages.get("labels", {})),
        intrapartum_points=frozenset(stages.get("intrapartum_points", [])),
        stage_enders={stage: frozenset(concepts) for stage, concepts in stages.get("ended_by", {}).items()},
        stage_rules=rules,
        scope=_scope(raw.get("scope") or {}),
        wording=_wording(raw.get("wording") or {}),
        clock=raw.get("clock", "age"),
        generic_terms=frozenset(t.lower() for t in raw.get("generic_terms", [])),
        population=dict(raw.get("population") or {}),
    )


def _scope(raw: dict) -> Scope:
    return Scope(raw.get("min_age"), raw.get("max_age"), raw.get("last_years"),
                 frozenset(raw.get("encounter_classes", [])), frozenset(g.lower() for g in raw.get("genders", [])))


def _wording(raw: dict) -> Wording:
    known = {k: v for k, v in raw.items() if k in Wording.__dataclass_fields__}
    if "stage_summary" in known:
        known["stage_summary"] = tuple(sorted(known["stage_summary"].items()))
    return Wording(**known)
