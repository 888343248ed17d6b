"""One patient's timeline as a clinician would recognise it (site-local view; it never leaves the site)."""

from __future__ import annotations

from pmlm.client.examples import build_examples, pregnancies
from pmlm.common.profiles import TaskProfile
from pmlm.common.schema import Timeline

# Observations worth a line of their own in a pregnancy view.
KEY_OBSERVATIONS = {
    "loinc:8480-6": "systolic BP",
    "loinc:8462-4": "diastolic BP",
    "loinc:29463-7": "weight",
    "loinc:39156-5": "BMI",
    "loinc:718-7": "hemoglobin",
}


def _fmt_value(value, unit: str) -> str:
    if isinstance(value, float):
        return f"{value:.1f} {unit}".strip()
    return f"{value} {unit}".strip()


def render_patient(timeline: Timeline, profile: TaskProfile, site: str = "", max_visits: int = 80) -> str:
    lines = [f"patient {timeline.patient_id}" + (f"  (site {site})" if site else "")]
    last = timeline.events[-1].time if timeline.events else None
    age = timeline.age_at(last) if last else None
    lines.append(f"  {timeline.gender or 'unknown sex'}, age {age:.0f} at last record, "
                 f"{len(timeline.events)} events" if age is not None else f"  {len(timeline.events)} events")
    episodes = pregnancies(timeline, profile)
    if profile.pregnancy_start:
        lines.append(f"  pregnancies: {len(episodes)}")
    for i, p in enumerate(episodes, 1):
        end = p.end.date().isoformat() if p.end else "ongoing"
        lines.append(f"    #{i}: {p.start.date()} -> {end}")

    examples = {ex.t: ex for ex in build_examples(timeline, profile, site)}
    lines.append("")
    lines.append("visits (prediction points marked *):")
    shown = 0
    by_time: dict = {}
    for e in timeline.events:
        by_time.setdefault(e.time, []).append(e)
    for when, group in by_time.items():
        encounters = [e for e in group if e.kind == "encounter"]
        if not encounters:
            continue
        enc = encounters[0]
        ex = examples.get(when)
        relevant = ex is not None or any(p.start <= when <= (p.end or when) for p in episodes)
        if profile.pregnancy_start and not relevant:
            continue
        mark = "*" if ex else " "
        gw = f" GA {ex.gestational_week:.0f}w" if ex and ex.gestational_week is not None else ""
        if ex and ex.weeks_postpartum is not None:
            gw = f" {ex.weeks_postpartum:.0f}w postpartum"
        lines.append(f" {mark} {when.date()} {profile.name_of(enc.concept)}{gw}")
        obs = [f"{KEY_OBSERVATIONS[e.concept]} {_fmt_value(e.value, e.unit)}"
               for e in group if e.kind == "observation" and e.concept in KEY_OBSERVATIONS and e.value is not None]
        done = sorted({profile.name_of(e.concept) for e in group
                       if e.kind in ("procedure", "condition", "immunization", "medication", "report")})
        if obs:
            lines.append(f"      observed: {', '.join(obs)}")
        if done:
            lines.append(f"      recorded: {', '.join(done)}")
        if ex:
            names = ", ".join(profile.name_of(c) for c in ex.targets) or "none"
            lines.append(f"      next {profile.horizon_days} days: {names}")
        shown += 1
        if shown >= max_visits:
            lines.append("    ... (more visits not shown)")
            break
    if shown == 0:
        lines.append("    (no visits relevant to this profile)")
    return "\n".join(lines)
