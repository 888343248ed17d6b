"""Self-informed features for one patient, computed on site: what the recommender expects next for her,
and how her own trajectory has changed. These feed the prompt's "about her" section; none of it leaves
the site. Times are relative (weeks, days before now); no absolute dates.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field

import numpy as np

from pmlm.client.examples import GESTATION_OFFSET_WEEKS, Example
from pmlm.client.features import FeatureEncoder
from pmlm.client.train import predict
from pmlm.common.model import NextEventRecommender
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Timeline

SYSTOLIC, DIASTOLIC, WEIGHT = "loinc:8480-6", "loinc:8462-4", "loinc:29463-7"
# A gap longer than the profile's scheduled interval (its episode's "schedule") plus this slack means an expected
# visit did not happen.
MISSED_VISIT_SLACK_DAYS = 10
RAISED_SYSTOLIC, RAISED_DIASTOLIC = 140.0, 90.0  # hypertensive range (mmHg), in and outside pregnancy
BP_RISE_MMHG = 15.0
WEIGHT_CHANGE_KG = 2.0


@dataclass
class PredictedEvent:
    concept: str
    name: str
    probability: float


@dataclass
class TrajectoryChange:
    kind: str  # rising_blood_pressure | weight_change | missed_visit | new_condition
    text: str  # readable, relative times only
    values: dict = field(default_factory=dict)


@dataclass
class SelfFeatures:
    predictions: list[PredictedEvent]
    changes: list[TrajectoryChange]
    gestational_week: float | None = None
    weeks_postpartum: float | None = None
    left_out: list[PredictedEvent] = field(default_factory=list)  # ranked among her top k, impossible at her stage

    def as_dict(self) -> dict:
        return asdict(self)


def top_predictions(model: NextEventRecommender, encoder: FeatureEncoder, example: Example,
                    k: int = 5) -> list[PredictedEvent]:
    """Her k most likely events within the profile's horizon, with readable names and probabilities."""
    return possible_predictions(model, encoder, example, k)[0]


def possible_predictions(model: NextEventRecommender, encoder: FeatureEncoder, example: Example, k: int = 5,
                         impossible: Collection[str] = ()) -> tuple[list[PredictedEvent], list[PredictedEvent]]:
    """(her k most likely events that are possible at her stage, the impossible ones ranked among them)."""
    probs = predict(model, [example], encoder)[0]
    profile = encoder.profile
    kept, left_out = [], []
    for j in np.argsort(-probs):
        if len(kept) >= k:
            break
        event = PredictedEvent(profile.concepts[j].id, profile.concepts[j].name, round(float(probs[j]), 3))
        (left_out if event.concept in impossible else kept).append(event)
    return kept, left_out


def _series(example: Example, concept: str) -> list[tuple[float, float]]:
    """(days before now, value) of one numeric observation, oldest first."""
    return [(h.days_before, float(h.value)) for h in example.history
            if h.concept == concept and isinstance(h.value, (int, float))]


def blood_pressure_change(example: Example, window_days: float = 280) -> TrajectoryChange | None:
    sys_, dia = _series(example, SYSTOLIC), _series(example, DIASTOLIC)
    sys_ = [(d, v) for d, v in sys_ if d <= window_days]
    dia = [(d, v) for d, v in dia if d <= window_days]
    if len(sys_) < 2 or not dia:
        return None
    (first_days, first), (last_days, last) = sys_[0], sys_[-1]
    last_dia = dia[-1][1]
    rise = last - first
    raised = last >= RAISED_SYSTOLIC or last_dia >= RAISED_DIASTOLIC
    if rise < BP_RISE_MMHG and not raised:
        return None
    weeks = (first_days - last_days) / 7
    text = (f"blood pressure {last:.0f}/{last_dia:.0f} mmHg at the latest reading, systolic "
            f"{'up' if rise >= 0 else 'down'} {abs(rise):.0f} mmHg over {weeks:.0f} weeks")
    if raised:
        text += " (in the hypertensive range)"
    return TrajectoryChange("rising_blood_pressure", text,
                            {"systolic": last, "diastolic": last_dia, "systolic_rise": rise, "weeks": weeks})


def weight_change(example: Example, window_days: float = 280) -> TrajectoryChange | None:
    series = [(d, v) for d, v in _series(example, WEIGHT) if d <= window_days]
    if len(series) < 2:
        return None
    (first_days, first), (last_days, last) = series[0], series[-1]
    change = last - first
    if abs(change) < WEIGHT_CHANGE_KG:
        return None
    weeks = (first_days - last_days) / 7
    return TrajectoryChange("weight_change", f"weight {'gained' if change > 0 else 'lost'} {abs(change):.1f} kg "
                            f"over {weeks:.0f} weeks (now {last:.1f} kg)", {"kg": change, "weeks": weeks})


def expected_interval_days(profile: TaskProfile, week: float) -> float | None:
    """The scheduled interval between routine visits at `week` of the profile's episode (None: no schedule)."""
    for until, days in profile.visit_schedule:
        if until is None or week < until:
            return days
    return None


def _every(days: float) -> str:
    weeks = round(days / 7)
    return "every week" if weeks == 1 else f"every {weeks} weeks"


def missed_visit(example: Example, profile: TaskProfile) -> TrajectoryChange | None:
    """A routine visit of the profile's schedule (obgyn: prenatal visits, ACOG's intervals) that it expected
    before this one but the record does not show; only for a profile with a pregnancy episode and a schedule.

    Only this pregnancy's visits count (a visit of an earlier pregnancy is no prenatal care for this one), and
    at a prenatal visit the gap is the one that today's visit ended: she is not "without a visit" today."""
    if example.gestational_week is None or not profile.scheduled_visits:
        return None
    pregnancy_days = (example.gestational_week - GESTATION_OFFSET_WEEKS) * 7  # since its start in her record
    visits = [h.days_before for h in example.history if h.kind == "encounter" and h.concept in profile.scheduled_visits
              and h.days_before <= pregnancy_days + 0.5]
    earlier = [d for d in visits if d > 0.5]
    if not earlier:
        return None
    gap = min(earlier)
    week_then = example.gestational_week - gap / 7
    expected = expected_interval_days(profile, week_then)
    if expected is None or gap <= expected + MISSED_VISIT_SLACK_DAYS:
        return None
    schedule = f"routine schedule at gestational week {week_then:.0f}: about {_every(expected)}"
    if len(visits) > len(earlier):  # a prenatal visit today: the gap ended with it
        text = f"{gap / 7:.0f} weeks between her previous prenatal visit and today's ({schedule})"
    else:
        text = f"no prenatal visit in the last {gap / 7:.0f} weeks ({schedule})"
    return TrajectoryChange("missed_visit", text, {"gap_days": gap, "expected_days": expected,
                                                   "visit_today": len(visits) > len(earlier)})


def new_conditions(example: Example, names: dict[str, str]) -> list[TrajectoryChange]:
    """Conditions first recorded since her previous visit (at or before this one)."""
    encounters = sorted({h.days_before for h in example.history if h.kind == "encounter" and h.days_before > 0.5})
    since = encounters[0] if encounters else float("inf")
    seen_before = {h.concept for h in example.history if h.kind == "condition" and h.days_before >= since}
    fresh = {h.concept: h.days_before for h in example.history
             if h.kind == "condition" and h.days_before < since and h.concept not in seen_before}
    return [TrajectoryChange("new_condition", f"new since the last visit: {names.get(c, c)} "
                             f"({'today' if days < 0.5 else f'{days:.0f} days ago'})", {"concept": c})
            for c, days in sorted(fresh.items(), key=lambda kv: kv[1])]


def self_informed_features(model: NextEventRecommender, encoder: FeatureEncoder, example: Example,
                           timeline: Timeline | None = None, k: int = 5,
                           impossible: Collection[str] = ()) -> SelfFeatures:
    """Top-k predicted next events (of those possible at her stage) and trajectory changes for the patient at
    `example`'s prediction point."""
    names = {e.concept: e.display for e in timeline.events} if timeline is not None else {}
    names.update({c.id: c.name for c in encoder.profile.concepts})
    changes = [c for c in (blood_pressure_change(example), weight_change(example), missed_visit(example, encoder.profile)) if c]
    changes += new_conditions(example, names)
    predictions, left_out = possible_predictions(model, encoder, example, k, impossible)
    return SelfFeatures(predictions, changes, example.gestational_week, example.weeks_postpartum, left_out)
