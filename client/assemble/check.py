"""Every answer checked against its prompt, and the care checklist shown before it.

A small LLM restates her history with changed times, invents care items, quotes percentages the prompt
never gave and writes more items than asked. Each item (bullet) of the answer is checked on-site:

- a care concept it names must be in her prompt or her record (the profile's names and synonyms, as
  the reward matches them), and possible at her stage of pregnancy;
- its numbers (percentages, "N weeks ago", her gestational week, blood pressure, weight) must be the
  prompt's, and a time ahead must lie within the prompt's horizon;
- items beyond the number the prompt allows are removed.

The result says which items are kept and why each flagged one is flagged. The care checklist is what PMLM
itself predicts for her, taken from the assembled prompt's parts (not parsed from its text). No Flower here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pmlm.client.reward import ConceptMatcher
from pmlm.common.assemble.render import Prompt

NOTICE = "decision support, not a diagnosis; check against the record"
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

_BULLET = re.compile(r"^\s*(?:[-*•+]|\(?\d{1,2}[.)])(?:\s+|$)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30.4, "year": 365.25}
_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*(day|week|month|year)s?\s+ago\b", re.IGNORECASE)
_AHEAD = re.compile(r"\b(?:in|within|next|over|after)\s+(?:the\s+)?(?:next\s+)?(\d+(?:\.\d+)?)\s*"
                    r"(day|week|month|year)s?\b(?!\s+(?:prior|before|ago|earlier|since))", re.IGNORECASE)
_GEST_WEEK = re.compile(r"(?:gestational\s+week|week\s+of\s+(?:her\s+)?pregnancy)\s+(\d+)|(\d+)\s*weeks?\s+"
                        r"(?:pregnant|of\s+gestation|gestation)", re.IGNORECASE)
_POSTPARTUM = re.compile(r"(\d+)\s*weeks?\s+(?:after\s+(?:the\s+end\s+of\s+her\s+pregnancy|delivery|birth)"
                         r"|postpartum|post-partum)", re.IGNORECASE)
_PRESSURE = re.compile(r"(\d{2,3})\s*/\s*(\d{2,3})(?:\s*mm\s*hg)?", re.IGNORECASE)
_KG = re.compile(r"(\d+(?:\.\d+)?)\s*kg\b", re.IGNORECASE)


# --- the answer's items --------------------------------------------------------------------------------------


@dataclass
class CheckedItem:
    text: str
    reasons: list[str] = field(default_factory=list)  # why it is flagged; empty: nothing found against it
    removed: bool = False  # beyond the items the prompt allows: not shown as advice
    counted: bool = True  # a bullet (or a line of a bullet-less answer); False: text around the bullets


@dataclass
class AnswerCheck:
    items: list[CheckedItem]
    allowed: int | None  # items the prompt allows; None: its format names no number
    text: str  # the answer without the removed items, otherwise as the LLM wrote it

    @property
    def kept(self) -> list[CheckedItem]:
        return [i for i in self.items if not i.removed]

    @property
    def flagged(self) -> list[CheckedItem]:
        return [i for i in self.items if i.reasons]

    @property
    def removed(self) -> list[CheckedItem]:
        return [i for i in self.items if i.removed]


def split_items(answer: str) -> list[tuple[str, bool, list[int]]]:
    """(text, counted, line numbers) per item: bullets and numbered lines with their continuation lines; in an
    answer without bullets every non-empty line is an item."""
    lines = answer.splitlines()
    has_bullets = any(_BULLET.match(line) for line in lines)
    items: list[tuple[str, bool, list[int]]] = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        if not has_bullets or _BULLET.match(line):
            # a heading over bullets ("2. Recent:") or an empty bullet is no care item: not counted
            content = _BULLET.sub("", line).strip()
            items.append((line.strip(), bool(content) and not content.endswith(":"), [n]))
        elif items and _BULLET.match(lines[items[-1][2][0]]) and line[:1].isspace():  # continues the bullet above
            text, counted, numbers = items[-1]
            items[-1] = (f"{text} {line.strip()}", counted, numbers + [n])
        else:  # an introduction or closing line around the bullets
            items.append((line.strip(), False, [n]))
    return items


# --- what the prompt states ----------------------------------------------------------------------------------


def _days(value: str, unit: str) -> float:
    return float(value) * _UNIT_DAYS[unit.lower()]


def _close(a: float, b: float) -> bool:
    """Two durations in days that say the same ('35 days ago' and '5 weeks ago'; rounding to weeks)."""
    return abs(a - b) <= max(3.5, 0.1 * max(a, b))


@dataclass
class _PromptNumbers:
    text: str
    percents: set[float]
    ago: list[float]  # days
    ago_by_concept: dict[str, list[float]]
    percents_by_concept: dict[str, set[float]]
    gestational_week: set[int]
    postpartum_weeks: set[int]
    pressures: set[tuple[int, int]]
    kgs: set[float]
    horizon_days: float | None


def _prompt_numbers(prompt: Prompt, matcher: ConceptMatcher) -> _PromptNumbers:
    text = "\n".join(m["content"] for m in prompt.messages)
    lines = text.splitlines()
    ago_by, pct_by = {}, {}
    for line in lines:
        concepts = matcher.mentioned(line)
        for c in concepts:
            ago_by.setdefault(c, []).extend(_days(v, u) for v, u in _AGO.findall(line))
            ago_by[c].extend([0.0] if re.search(r"\btoday\b", line) else [])
            pct_by.setdefault(c, set()).update(float(v) for v in _PERCENT.findall(line))
    horizon = re.search(r"next (\d+) weeks", text)
    return _PromptNumbers(
        text=text,
        percents={float(v) for v in _PERCENT.findall(text)},
        ago=[_days(v, u) for v, u in _AGO.findall(text)] + ([0.0] if re.search(r"\btoday\b", text) else []),
        ago_by_concept=ago_by, percents_by_concept=pct_by,
        gestational_week={int(a or b) for a, b in _GEST_WEEK.findall(text)},
        postpartum_weeks={int(v) for v in _POSTPARTUM.findall(text)},
        pressures={(int(a), int(b)) for a, b in _PRESSURE.findall(text)},
        kgs={float(v) for v in _KG.findall(text)},
        horizon_days=int(horizon.group(1)) * 7 if horizon else None,
    )


def _fmt(x: float) -> str:
    return f"{x:g}"


def _number_reasons(item: str, concepts: set[str], numbers: _PromptNumbers, names: Mapping[str, str]) -> list[str]:
    reasons = []
    for value in (float(v) for v in _PERCENT.findall(item)):
        stated = set().union(*(numbers.percents_by_concept.get(c, set()) for c in concepts)) if concepts else set()
        if stated and value not in stated:
            about = ", ".join(sorted(names.get(c, c) for c in concepts if numbers.percents_by_concept.get(c)))
            reasons.append(f"says {_fmt(value)}% where the prompt says "
                           f"{' or '.join(_fmt(v) + '%' for v in sorted(stated))} ({about})")
        elif value not in numbers.percents:
            reasons.append(f"says {_fmt(value)}%, a figure the prompt does not give")
    for value, unit in _AGO.findall(item):
        days = _days(value, unit)
        stated = [d for c in concepts for d in numbers.ago_by_concept.get(c, [])]
        if stated and not any(_close(days, d) for d in stated):
            reasons.append(f"says {value} {unit.lower()}{'s' if value != '1' else ''} ago where the prompt gives "
                           f"another time for it")
        elif not stated and not any(_close(days, d) for d in numbers.ago):
            reasons.append(f"says {value} {unit.lower()}{'s' if value != '1' else ''} ago, a time the prompt "
                           f"does not give")
    if numbers.horizon_days is not None:
        for value, unit in _AHEAD.findall(item):
            if _days(value, unit) > numbers.horizon_days + 0.5:
                reasons.append(f"looks {value} {unit.lower()}s ahead, beyond the prompt's "
                               f"{numbers.horizon_days // 7}-week horizon")
    for a, b in _GEST_WEEK.findall(item):
        if numbers.gestational_week and int(a or b) not in numbers.gestational_week:
            reasons.append(f"says gestational week {a or b} where the prompt says "
                           f"{', '.join(map(str, sorted(numbers.gestational_week)))}")
    for value in _POSTPARTUM.findall(item):
        if numbers.postpartum_weeks and int(value) not in numbers.postpartum_weeks:
            reasons.append(f"says {value} weeks after the end of her pregnancy where the prompt says "
                           f"{', '.join(map(str, sorted(numbers.postpartum_weeks)))}")
    for a, b in _PRESSURE.findall(item):
        if (int(a), int(b)) not in numbers.pressures and 60 <= int(a) <= 250:
            reasons.append(f"says blood pressure {a}/{b}, a reading the prompt does not give")
    for value in _KG.findall(item):
        if float(value) not in numbers.kgs:
            reasons.append(f"says {value} kg, a figure the prompt does not give")
    return reasons


# --- the check -----------------------------------------------------------------------------------------------


def check_answer(answer: str, prompt: Prompt, matcher: ConceptMatcher, record: Iterable[str] = (),
                 impossible: Mapping[str, str] | None = None) -> AnswerCheck:
    """Each item of `answer` checked against `prompt`, her `record`'s concepts and what cannot follow her stage
    (`impossible`: concept -> why); items beyond the prompt's allowed count are removed."""
    impossible = dict(impossible or {})
    numbers = _prompt_numbers(prompt, matcher)
    in_prompt = matcher.mentioned(numbers.text)
    grounded = in_prompt | set(record)
    names = {c.id: c.name for c in matcher.profile.concepts}
    items: list[CheckedItem] = []
    removed_lines: set[int] = set()
    answer_lines = answer.splitlines()
    split = split_items(answer)
    total = sum(counted for _, counted, _ in split)
    counted = 0
    for text, is_counted, lines in split:
        item = CheckedItem(text, counted=is_counted)
        concepts = matcher.mentioned(text)
        for c in sorted(concepts, key=lambda c: names.get(c, c)):
            if c in impossible and c not in in_prompt and not (c in grounded and _AGO.search(text)):
                item.reasons.append(f"names {names.get(c, c)}, which cannot happen at this stage: {impossible[c]}")
            elif c not in grounded:
                item.reasons.append(f"names {names.get(c, c)}, which is neither in the prompt nor in the record")
        item.reasons += _number_reasons(text, concepts, numbers, names)
        # Past the allowed count every further bullet goes, with the headings and empty bullets among them.
        past_limit = prompt.max_items is not None and total > prompt.max_items and counted >= prompt.max_items
        counted += is_counted
        if past_limit and (is_counted or _BULLET.match(answer_lines[lines[0]])):
            item.removed = True
            item.reasons.append(f"beyond the {prompt.max_items} items the prompt allows: removed")
            removed_lines.update(lines)
        items.append(item)
    kept_text = "\n".join(line for n, line in enumerate(answer_lines) if n not in removed_lines)
    return AnswerCheck(items, prompt.max_items, kept_text.strip("\n") + ("\n" if answer.endswith("\n") else ""))


def record_concepts(example) -> set[str]:
    """The concepts of her record up to the prediction point (an Example's history)."""
    return {h.concept for h in example.history}


def check_advice(answer: str, assembled, example, matcher: ConceptMatcher) -> AnswerCheck:
    """`check_answer` for an assembled prompt (client.assemble.assembler.Assembled) and her example."""
    impossible = assembled.stage.impossible if assembled.stage else {}
    return check_answer(answer, assembled.prompt, matcher, record_concepts(example), impossible)


# --- the care checklist ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChecklistItem:
    section: str  # "predicted" | "trajectory" | "peers"
    text: str
    source: str
    probability: float | None = None  # her predicted events only


@dataclass
class CareChecklist:
    stage: str | None  # her stage of pregnancy in words, e.g. "pregnant, gestational week 30"
    horizon_weeks: int | None
    items: list[ChecklistItem]
    peer_group: str = ""  # e.g. "Among about 290 similar patients across the consortium:"
    left_out: list = field(default_factory=list)  # stage.LeftOut: impossible at her stage, not in the prompt


PREDICTED_SOURCE = "predictions (the consortium's recommender on the patient's own record)"
TRAJECTORY_SOURCE = "the patient's record (trajectory)"
PEER_SOURCE = "similar patients (DP peer profile)"


def care_checklist(assembled) -> CareChecklist:
    """What PMLM predicts for her, with sources, from the assembled prompt's parts."""
    prompt: Prompt = assembled.prompt
    items = [ChecklistItem("predicted", name, PREDICTED_SOURCE, float(p)) for name, p in prompt.predictions]
    items += [ChecklistItem("trajectory", t, TRAJECTORY_SOURCE) for t in prompt.trajectory]
    header, *facts = prompt.peer_facts or [""]
    items += [ChecklistItem("peers", f, PEER_SOURCE) for f in facts]
    horizon = re.search(r"next (\d+) weeks", "\n".join(m["content"] for m in prompt.messages))
    return CareChecklist(assembled.stage.label if assembled.stage else None,
                         int(horizon.group(1)) if horizon else None, items, header, list(assembled.left_out))


# --- the notice ------------------------------------------------------------------------------------------------


def model_label(config, model: str | None = None) -> str:
    """Which model answered and where it runs, e.g. 'smollm2 (local, embedded SmolLM2-135M-Instruct)'.
    `config` is the site's LLMConfig (no base_url: the embedded server); `model` as the endpoint reported it."""
    base_url = getattr(config, "base_url", None)
    if not base_url:
        return f"smollm2 (local, embedded {EMBEDDED_MODEL})"
    name = getattr(config, "model", None) or model or "unnamed model"
    host = urlsplit(base_url).hostname or base_url
    where = "local endpoint" if host in ("localhost", "127.0.0.1", "::1") else "remote endpoint"
    return f"{name} ({where} {host})"


def advice_notice(label: str) -> str:
    return f"Generated by {label} — {NOTICE}."


# --- as text (pmlm advise) -------------------------------------------------------------------------------------


def format_checklist(checklist: CareChecklist) -> str:
    weeks = f" in the next {checklist.horizon_weeks} weeks" if checklist.horizon_weeks else ""
    lines = ["Care checklist: what PMLM predicts for this patient, with sources"]
    if checklist.stage:
        lines.append(f"  Stage: {checklist.stage}")
    sections = (("predicted", f"Predicted care{weeks} — {PREDICTED_SOURCE}"),
                ("trajectory", f"Changes in her trajectory — {TRAJECTORY_SOURCE}"),
                ("peers", f"{checklist.peer_group.rstrip(':') or 'Similar patients'} — {PEER_SOURCE}"))
    for section, title in sections:
        chosen = [i for i in checklist.items if i.section == section]
        if not chosen:
            continue
        lines.append(f"  {title}:")
        lines += [f"    [ ] {i.text}" + (f" ({i.probability:.0%})" if i.probability is not None else "")
                  for i in chosen]
    if not checklist.items:
        lines.append("  (no predictions, trajectory changes or peer facts in the prompt)")
    if checklist.left_out:
        lines.append("  Left out of the prompt, impossible at this stage:")
        by_why: dict[str, list[str]] = {}
        for x in checklist.left_out:
            by_why.setdefault(x.why, []).append(x.text if x.source == "the patient's predictions" else f"{x.text} (peers)")
        lines += [f"    {why}: {', '.join(texts)}" for why, texts in by_why.items()]
    return "\n".join(lines)


def format_checked_answer(check: AnswerCheck) -> str:
    """The answer as the LLM wrote it, less the removed items, each flag under its item ('! ...')."""
    lines = []
    for item in check.kept:
        lines.append(item.text)
        lines += [f"  ! {reason}" for reason in item.reasons]
    if check.removed:
        lines.append(f"Removed, beyond the {check.allowed} items the prompt allows:")
        lines += [f"  x {item.text}" for item in check.removed]
    flagged = sum(1 for i in check.kept if i.reasons)
    lines.append(f"(checked against the prompt and the record: {flagged} of {len(check.kept)} items flagged, "
                 f"{len(check.removed)} removed)")
    return "\n".join(lines)
