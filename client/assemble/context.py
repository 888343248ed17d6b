"""Her de-identified prompt context, assembled on-site from her record, her predictions and her peers.

Only the profile's readable names, relative times and rounded values enter the context; free text
from the record goes in as notes, which the renderer quotes and neutralises.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable

from pmlm.client.examples import Example, prediction_points
from pmlm.common.assemble.render import PatientContext
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Timeline

VITALS = {"loinc:8480-6": ("systolic blood pressure", "mmHg"), "loinc:8462-4": ("diastolic blood pressure", "mmHg"),
          "loinc:29463-7": ("weight", "kg"), "loinc:39156-5": ("BMI", "kg/m2")}


def notes_a_prompt_shows(profile: TaskProfile) -> Callable[[Timeline], set[int]]:
    """For a reader of records (deidentify.NoteText): the positions of the notes a prompt of `profile` can show,
    her latest note with text up to each of her prediction points (build_context's rule, below). The others'
    text is never read, so a site's reading need not scrub it (most of reading the sample's notes)."""
    def shown(timeline: Timeline) -> set[int]:
        notes = [i for i, e in enumerate(timeline.events) if e.kind == "note" and isinstance(e.value, str)]
        times = [timeline.events[i].time for i in notes]  # sorted, as the events are
        before = (bisect_right(times, p.time) for p in prediction_points(timeline, profile))  # notes at or before
        return {notes[n - 1] for n in before if n}
    return shown


def _ago(days: float) -> str:
    d = int(round(days))
    if d <= 0:
        return "today"
    if d < 14:
        return f"{d} days ago"
    return f"{round(d / 7)} weeks ago"


def build_context(example: Example, profile: TaskProfile, timeline: Timeline | None = None, *,
                  predictions: list[tuple[str, float]] | None = None, trajectory: list[str] | None = None,
                  peer_facts: list[str] | None = None, history_days: int = 120, max_history: int = 6,
                  with_oracle: bool = False) -> PatientContext:
    recent, seen = [], set()
    for item in reversed(example.history):  # newest first
        if item.days_before > history_days or len(recent) >= max_history:
            break
        if item.kind in ("observation", "note", "encounter") or item.concept not in profile.index:
            continue
        if item.concept in seen:
            continue
        seen.add(item.concept)
        recent.append(f"{profile.name_of(item.concept)} ({_ago(item.days_before)})")
    latest: dict[str, float] = {}
    for item in example.history:
        if item.concept in VITALS and isinstance(item.value, float) and item.days_before <= history_days:
            latest[item.concept] = item.value
    observations = []
    if "loinc:8480-6" in latest and "loinc:8462-4" in latest:
        observations.append(f"blood pressure {latest['loinc:8480-6']:.0f}/{latest['loinc:8462-4']:.0f} mmHg")
    for concept in ("loinc:29463-7", "loinc:39156-5"):
        if concept in latest:
            name, unit = VITALS[concept]
            observations.append(f"{name} {latest[concept]:.0f} {unit}")
    notes = []
    if timeline is not None:
        past = [e for e in timeline.events if e.kind == "note" and e.time <= example.t and isinstance(e.value, str)]
        if past:
            notes.append(past[-1].value)
    return PatientContext(
        age_years=int(example.age_years) if example.age_years is not None else None,
        gestational_week=int(example.gestational_week) if example.gestational_week is not None else None,
        weeks_postpartum=int(example.weeks_postpartum) if example.weeks_postpartum is not None else None,
        visit=profile.name_of(example.point),
        history=recent,
        observations=observations,
        notes=notes,
        predictions=list(predictions or []),
        trajectory=list(trajectory or []),
        peer_facts=list(peer_facts or []),
        horizon_weeks=round(profile.horizon_days / 7),
        oracle=[profile.name_of(c) for c in example.targets] if with_oracle else [],
        wording=profile.wording,
        gender=example.gender or (timeline.gender if timeline is not None else ""),
    )
