"""Her stage of pregnancy at the prediction point, and the care events that cannot follow it.

The profile says which concepts are impossible at which stage (its "stages" section); her stage comes from
her record: a gestational week while pregnant, the delivery admission, weeks after the end of the pregnancy.
Predictions and peer facts naming an impossible concept are left out of her prompt, and an answer naming one
is flagged. A profile without stages (chronic) has no stage and nothing impossible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pmlm.client.examples import GESTATION_OFFSET_WEEKS, Example
from pmlm.common.profiles import TaskProfile


# The record closes a pregnancy up to this long after the delivery or loss that ended it (the generator: 7 days).
ENDING_RECORDED_WITHIN_DAYS = 42


@dataclass(frozen=True)
class HerStage:
    name: str  # prenatal | intrapartum | postpartum | loss
    label: str  # e.g. "after the end of her pregnancy (6 weeks ago)"
    impossible: dict[str, str] = field(default_factory=dict)  # concept -> why it cannot follow this stage
    ended_days_ago: float | None = None  # when her pregnancy ended; None while it goes on


def _ago(days: float) -> str:
    return "today" if days < 0.5 else f"{days:.0f} days ago" if days < 14 else f"{days / 7:.0f} weeks ago"


def her_stage(profile: TaskProfile, example: Example) -> HerStage | None:
    """Her stage at the prediction point. While the record counts her pregnant, an event that ends a pregnancy
    (a delivery, a loss: the profile's `ended_by`) recorded since it began moves her on: the record keeps the
    pregnancy open for a while after a miscarriage, and a delivery is recorded at its admission."""
    name = profile.stage_at(example.point, example.gestational_week, example.weeks_postpartum)
    if name is None:
        return None
    ended = example.weeks_postpartum * 7 if example.weeks_postpartum is not None else None
    if ended is None and example.gestational_week is not None:  # the events since her pregnancy began
        window = (-1.0, (example.gestational_week - GESTATION_OFFSET_WEEKS) * 7 + 0.5)
    elif ended is not None:  # the event that ended it, a little before the record closes the pregnancy
        window = (ended - 0.5, ended + ENDING_RECORDED_WITHIN_DAYS)
    else:
        window = None
    for stage, concepts in profile.stage_enders.items() if window else ():
        days = [h.days_before for h in example.history if h.concept in concepts and window[0] <= h.days_before
                <= window[1]]
        if days:
            name, ended = stage, min(days)
            break
    label = profile.stage_labels.get(name, name)
    if ended is not None:
        label = f"{label} ({_ago(ended)})"
    elif example.gestational_week is not None:
        label = f"{label}, gestational week {example.gestational_week:.0f}"
    return HerStage(name, label, profile.impossible_at(name, example.gestational_week), ended)


@dataclass(frozen=True)
class LeftOut:
    """A predicted event or peer fact left out of her prompt because it cannot follow her stage."""

    text: str  # as it would have appeared, e.g. "augmentation of labor (12%)"
    source: str  # "the patient's predictions" or "similar patients (DP peer profile)"
    why: str


def left_out_note(stage: HerStage, left_out: list[LeftOut]) -> str | None:
    """The plain note that says which items were left out and why (None when none were)."""
    if not left_out:
        return None
    by_why: dict[str, list[str]] = {}
    for item in left_out:
        by_why.setdefault(item.why, []).append(f"{item.text} [{item.source}]")
    reasons = "; ".join(f"{', '.join(items)}: {why}" for why, items in by_why.items())
    return f"left out of the prompt as impossible at this stage ({stage.label}): {reasons}"
