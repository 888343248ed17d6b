"""Timelines -> prediction examples: at each prediction point t, her history up to t and what happened in (t, t+h].

Only the points inside the profile's scope (who and when: age, the recent part of the record, encounter class)
are examples, for training and evaluation alike.

Times inside an example are relative (days before t, gestational week); the absolute time t stays
in the example only for on-site bookkeeping and never enters a prompt or a message.

Memory: the examples of one patient share her events, kept once in compact arrays (``PatientEvents``); each
example's history is a view of their first n (``History``), read as HistoryItems on demand. A copy per example
cost about 2 MB a patient (every point repeats the years before it), which a site of 1,000 women cannot hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# (concept, kind, unit) of every event seen by this process, each stored once; events refer to them by number.
# Codes and units only, the same vocabulary for every site: nothing about a patient.
_TRIPLES: list[tuple[str, str, str]] = []
_TRIPLE_INDEX: dict[tuple[str, str, str], int] = {}
_CONCEPT_INDEX: dict[str, int] = {}
_TRIPLE_CONCEPT: list[int] = []  # triple -> number of its concept


def _triple(concept: str, kind: str, unit: str) -> int:
    key = (concept, kind, unit)
    index = _TRIPLE_INDEX.get(key)
    if index is None:
        index = _TRIPLE_INDEX[key] = len(_TRIPLES)
        _TRIPLES.append(key)
        _TRIPLE_CONCEPT.append(_CONCEPT_INDEX.setdefault(concept, len(_CONCEPT_INDEX)))
    return index


def triple_table() -> tuple[list[tuple[str, str, str]], list[int]]:
    """Every (concept, kind, unit) so far, and each one's concept number (the same concept under two kinds or units
    has one number): what ``PatientEvents.codes`` refer to."""
    return _TRIPLES, _TRIPLE_CONCEPT


class PatientEvents:
    """One patient's events, oldest first, in arrays: microseconds since 1970, the (concept, kind, unit) number, the
    numeric value (NaN: none) and the text values by position. Note text is never kept (examples carry none)."""

    __slots__ = ("micros", "codes", "numbers", "texts")

    def __init__(self, events: list[Event]):
        self.micros = np.fromiter(((e.time - _EPOCH) // _MICROSECOND for e in events), np.int64, len(events))
        self.codes = np.fromiter((_triple(e.concept, e.kind, e.unit) for e in events), np.int32, len(events))
        self.numbers = np.full(len(events), np.nan)
        self.texts: dict[int, str] = {}
        for i, e in enumerate(events):
            if e.kind == "note" or e.value is None:
                continue
            if isinstance(e.value, str):
                self.texts[i] = e.value
            else:
                self.numbers[i] = e.value

    def __reduce__(self):
        # Codes number this process's table: a copy for another process carries the triples they stand for.
        used, codes = np.unique(self.codes, return_inverse=True)
        return _restore_events, (self.micros, codes.astype(np.int32), self.numbers, self.texts,
                                 [_TRIPLES[i] for i in used])

    def item(self, i: int, t_micros: int) -> HistoryItem:
        concept, kind, unit = _TRIPLES[self.codes[i]]
        number = self.numbers[i]
        value = self.texts.get(i) if number != number else float(number)  # NaN: no number
        return HistoryItem(concept, kind, (int(t_micros) - int(self.micros[i])) / 10**6 / 86400, value, unit)


def _restore_events(micros, local_codes, numbers, texts, triples) -> PatientEvents:
    events = PatientEvents.__new__(PatientEvents)
    table = np.array([_triple(*t) for t in triples], dtype=np.int32)
    events.micros, events.codes, events.numbers, events.texts = micros, table[local_codes], numbers, texts
    return events


class History(Sequence):
    """Her events up to and including t, oldest first, as HistoryItems (days before t): a view of the patient's
    ``PatientEvents`` shared by all her examples, built item by item when read."""

    __slots__ = ("events", "n", "t_micros")

    def __init__(self, events: PatientEvents, n: int, t: datetime):
        self.events, self.n, self.t_micros = events, n, (t - _EPOCH) // _MICROSECOND

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("history index out of range")
        return self.events.item(i, self.t_micros)

    def __iter__(self):
        for i in range(self.n):
            yield self.events.item(i, self.t_micros)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == self.n and list(self) == list(other)

    def __repr__(self) -> str:
        return f"History({self.n} events)"


@dataclass(slots=True)
class Example:
    patient_id: str
    t: datetime  # site-local only
    point: str  # concept id of the prediction-point encounter
    history: Sequence[HistoryItem]  # a History when built from records; any list of HistoryItem works
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
    points = prediction_points(timeline, profile)
    shared = PatientEvents(events) if points else None
    examples = []
    seen = 0  # events are sorted by time: her history at t is the first `seen` of them
    for point in points:
        t = point.time
        age = timeline.age_at(t)
        while seen < len(events) and events[seen].time <= t:
            seen += 1
        targets, risks = set(), set()
        for e in events[seen:]:
            if e.time > t + horizon:
                break
            if profile.is_target(e.concept, e.kind):
                targets.add(e.concept)
                if e.concept in profile.risks:
                    risks.add(e.concept)
        history = History(shared, seen, t)
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
           history: Sequence[HistoryItem]) -> int | None:
    """The timing floor's reading on the profile's clock: 4-week steps since her first prenatal visit
    ("pregnancy"), 5-year age bands ("age"), or years since her first risk condition ("since_diagnosis");
    None where the clock does not run (outside a pregnancy, no diagnosis yet)."""
    if profile.clock == "pregnancy":
        return None if weeks_since_first_visit is None else int(weeks_since_first_visit // 4)
    if profile.clock == "since_diagnosis":
        days = [h.days_before for h in history if h.kind == "condition" and h.concept in profile.risks]
        return int(max(days) // 365.25) if days else None
    return None if age is None else int(age // 5)


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
