"""Timelines -> prediction examples: at each prediction point t, her history up to t and what happened in (t, t+h].

Only the points inside the profile's scope (who and when: age, the recent part of the record, encounter class)
are examples, for training and evaluation alike.

Times inside an example are relative (days before t, gestational week); the absolute time t stays
in the example only for on-site bookkeeping and never enters a prompt or a message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Event, Timeline

SPLITS = (("train", 70), ("val", 85), ("test", 100))
# Gestational age is counted from the last menstrual period, about two weeks before conception;
# the generator's pregnancy condition starts at conception.
GESTATION_OFFSET_WEEKS = 2.0


def patient_split(patient_id: str) -> str:
    """Stable train/val/test assignment by a hash of the patient id (no patient on two sides)."""
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, upper in SPLITS if bucket < upper)


@dataclass(slots=True)
class HistoryItem:
    concept: str
    kind: str
    days_before: float
    value: float | str | None = None
    unit: str = ""


@dataclass(slots=True)
class Example:
    patient_id: str
    t: datetime  # site-local only
    point: str  # concept id of the prediction-point encounter
    history: list[HistoryItem]
    targets: list[str]  # profile concepts in (t, t+h], sorted, unique
    risks: list[str]  # profile risk conditions in (t, t+h]
    split: str
    gestational_week: float | None = None  # while pregnant
    weeks_since_first_visit: float | None = None  # since the initial prenatal visit of this pregnancy
    weeks_postpartum: float | None = None  # after the pregnancy ended
    age_years: float | None = None
    site: str = ""
    extras: dict = field(default_factory=dict)
    gender: str = ""  # as her record spells it; the prompt's pronouns come from it where the profile says so
    clock: int | None = None  # the timing floor's reading at t, on the profile's clock (client.baselines)


@dataclass(slots=True)
class Pregnancy:
    start: datetime
    end: datetime | None
    first_visit: datetime | None = None


def pregnancies(timeline: Timeline, profile: TaskProfile) -> list[Pregnancy]:
    """Pregnancy episodes from the profile's pregnancy-start conditions, with the first prenatal visit."""
    if not profile.pregnancy_start:
        return []
    episodes = [Pregnancy(e.time, e.end) for e in timeline.events
                if e.kind == "condition" and e.concept in profile.pregnancy_start]
    for episode in episodes:
        for e in timeline.events:
            if e.kind == "encounter" and e.concept == profile.first_visit and e.time >= episode.start \
                    and (episode.end is None or e.time <= episode.end):
                episode.first_visit = e.time
                break
    return episodes


def _open_pregnancy(episodes: list[Pregnancy], t: datetime, slack_days: int = 120) -> Pregnancy | None:
    # Postnatal visits follow the end of the episode; they still belong to it for gestational context.
    for p in reversed(episodes):
        if p.start <= t and (p.end is None or t <= p.end + timedelta(days=slack_days)):
            return p
    return None


def prediction_points(timeline: Timeline, profile: TaskProfile) -> list[Event]:
    """Her encounters that are prediction points of the profile and inside its scope, oldest first."""
    events = timeline.events
    end = events[-1].time if events else None
    return [e for e in events if e.kind == "encounter" and e.concept in profile.prediction_points
            and profile.scope.admits(timeline.age_at(e.time), (end - e.time).days / 365.25, e.encounter_class,
                                     timeline.gender)]


def build_examples(timeline: Timeline, profile: TaskProfile, site: str = "") -> list[Example]:
    events = timeline.events
    horizon = timedelta(days=profile.horizon_days)
    episodes = pregnancies(timeline, profile)
    split = patient_split(timeline.patient_id)
    examples = []
    for point in prediction_points(timeline, profile):
        t = point.time
        age = timeline.age_at(t)
        history, targets, risks = [], set(), set()
        for e in events:
            if e.time <= t:
                history.append(_history_item(e, t))
            elif e.time <= t + horizon:
                if profile.is_target(e.concept, e.kind):
                    targets.add(e.concept)
                    if e.concept in profile.risks:
                        risks.add(e.concept)
            else:
                break
        episode = _open_pregnancy(episodes, t)
        pregnant = episode is not None and (episode.end is None or t <= episode.end)
        gest = ((t - episode.start).days / 7 + GESTATION_OFFSET_WEEKS) if pregnant else None
        postpartum = (t - episode.end).days / 7 if episode is not None and not pregnant else None
        since_first = ((t - episode.first_visit).days / 7) if episode and episode.first_visit else None
        examples.append(Example(
            patient_id=timeline.patient_id, t=t, point=point.concept, history=history,
            targets=sorted(targets), risks=sorted(risks), split=split, gestational_week=gest,
            weeks_since_first_visit=since_first, weeks_postpartum=postpartum, age_years=age, site=site,
            gender=timeline.gender, clock=_clock(profile, since_first, age, history),
        ))
    return examples


def _clock(profile: TaskProfile, weeks_since_first_visit: float | None, age: float | None,
           history: list[HistoryItem]) -> int | None:
    """The timing floor's reading on the profile's clock: 4-week steps since her first prenatal visit
    ("pregnancy"), 5-year age bands ("age"), or years since her first risk condition ("since_diagnosis");
    None where the clock does not run (outside a pregnancy, no diagnosis yet)."""
    if profile.clock == "pregnancy":
        return None if weeks_since_first_visit is None else int(weeks_since_first_visit // 4)
    if profile.clock == "since_diagnosis":
        days = [h.days_before for h in history if h.kind == "condition" and h.concept in profile.risks]
        return int(max(days) // 365.25) if days else None
    return None if age is None else int(age // 5)


def _history_item(e: Event, t: datetime) -> HistoryItem:
    value = e.value if e.kind != "note" else None  # note text stays in the timeline, not in examples
    return HistoryItem(e.concept, e.kind, (t - e.time).total_seconds() / 86400, value, e.unit)


def horizon_events(timeline: Timeline, profile: TaskProfile) -> tuple[int, int]:
    """(care events in the horizons after prediction points, of those the ones the vocabulary covers)."""
    horizon = timedelta(days=profile.horizon_days)
    total = covered = 0
    points = [e.time for e in prediction_points(timeline, profile)]
    for t in points:
        for e in timeline.events:
            if t < e.time <= t + horizon and e.kind in profile.target_kinds:
                total += 1
                covered += e.concept in profile.index
    return total, covered
