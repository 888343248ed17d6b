"""The privacy audit report: one self-contained HTML file (inline SVG, no scripts) and a JSON summary.

Input is ledgers that were already re-checked (`LedgerReplay`); the report shows what was
verified and what was not, so a failed check can never look like a clean report.
"""

from __future__ import annotations

import html
import importlib.util
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pmlm.common.atomic import write_atomic
from pmlm.common.privacy.accountant import ACCOUNTANT
from pmlm.common.privacy.events import PRIVACY_UNITS
from pmlm.common.privacy.ledger import UNSPECIFIED_NOISE_SOURCE, LedgerReplay
from pmlm.common.privacy.shared_noise import TRUST_ASSUMPTION
from pmlm.common.privacy.membership import (
    CONFIDENCE,
    advantage_bound,
    composed_epsilon,
    epsilon_lower_bound,
    tied_releases,
    verdict,
)

PHASE_COLOURS = ["#1f5fa8", "#d9731a", "#2e8b3e", "#8e44ad", "#b03a48", "#5d6d7e"]
UNIT_TITLES = {
    "patient-in-site": "record-level (one patient within one hospital)",
    "site": "hospital-level (one whole hospital)",
}


@dataclass
class AuditedLedger:
    """A ledger file after verification, as the report needs it."""

    path: Path
    kind: str  # "site ledger" or "coordinator copy"
    replay: LedgerReplay
    problems: list[str] = field(default_factory=list)
    key_note: str = ""

    @property
    def verified(self) -> bool:
        return not self.problems

    @property
    def site_id(self) -> str:
        return self.replay.site_id or "(unknown site)"

    @property
    def label(self) -> str:
        return self.site_id if self.kind == "site ledger" else f"{self.site_id} (coordinator copy)"

    def releases(self, unit: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.replay.entries
                if e.get("kind") == "release" and (unit is None or e.get("privacy_unit") == unit)]

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.replay.entries if e.get("kind") == "refusal"]

    def units(self) -> list[str]:
        seen = {e.get("privacy_unit") for e in self.releases()}
        return [u for u in PRIVACY_UNITS if u in seen]

    def shared_noise(self, unit: str) -> str | None:
        """The two ε figures of a unit whose releases shared noise across secure sums, in words; else None."""
        worst = self.replay.worst_case_epsilon(unit)
        shared = [e["noise"] for e in self.releases(unit) if isinstance(e.get("noise"), dict)]
        if worst is None or not shared:
            return None
        sites = sorted({n.get("min_sites") for n in shared if isinstance(n.get("min_sites"), int)})
        return (f"{_plural(len(shared), 'release')} with noise shared across secure sums of at least "
                f"{'/'.join(map(str, sites))} sites (each site adding σ/√k): the ε the site relies on (enforced) "
                f"assumes the sums carried the full σ; worst case, its own noise alone, ε = {worst:.4g}")


def summary(ledger: AuditedLedger) -> dict[str, Any]:
    """Per-site JSON: epsilon/epsilon_rdp/delta/budget/releases for the record-level unit, and every unit."""
    replay, budget = ledger.replay, ledger.replay.budget
    by_unit: dict[str, Any] = {}
    for unit in PRIVACY_UNITS:
        spent = replay.state.spent(unit) if replay.state else None
        phases = {}
        for phase in (budget.shares if budget else {}):
            phase_spent = replay.state.spent(unit, phase)
            phases[phase] = {
                "epsilon": phase_spent.pld, "cap": budget.phase_cap(phase),
                "remaining": replay.state.remaining(unit, phase),
                "releases": sum(1 for e in ledger.releases(unit) if e.get("phase") == phase),
            }
        by_unit[unit] = {
            "epsilon": spent.pld if spent else None,
            "epsilon_rdp": spent.rdp if spent else None,
            "remaining": replay.state.remaining(unit) if replay.state else None,
            "releases": len(ledger.releases(unit)),
            "phases": phases,
            "worst_case_epsilon": replay.worst_case_epsilon(unit) if replay.state else None,
        }
    primary = by_unit["patient-in-site"]
    return {
        "epsilon": primary["epsilon"],
        "epsilon_rdp": primary["epsilon_rdp"],
        "worst_case_epsilon": primary["worst_case_epsilon"],  # own noise alone; None: no noise was shared
        "delta": budget.delta if budget else None,
        "budget": {
            **(budget.to_dict() if budget else {}),
            "remaining": primary["remaining"],
            "phase_caps": {p: budget.phase_cap(p) for p in budget.shares} if budget else {},
        },
        "releases": len(ledger.releases()),
        "refusals": len(ledger.refusals()),
        "privacy_unit": "patient-in-site",
        "by_unit": by_unit,
        "verified": ledger.verified,
        "problems": ledger.problems,
        "ledger": str(ledger.path),
        "ledger_kind": ledger.kind,
        "accountant": sorted({e.get("accountant") for e in ledger.replay.entries if e.get("accountant")}),
    }


def summaries(ledgers: list[AuditedLedger], membership: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per ledger, `summary`; with the sites' membership audits, each site's rows under "membership"."""
    rows = membership_rows(membership, ledgers) if membership else None
    out: dict[str, Any] = {}
    for ledger in ledgers:
        key = ledger.label
        if key in out:
            key = f"{key} [{ledger.path}]"
        out[key] = summary(ledger)
        if rows is not None:
            out[key]["membership"] = [r for r in rows if r["site_id"] == ledger.site_id]
    return out


# -- SVG ------------------------------------------------------------------------------------

def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _cap_groups(caps: list[tuple[str, float, str]], py) -> list[list[tuple[str, float, str]]]:
    """Caps drawn within 2 px of each other, grouped (in ascending order of value)."""
    groups: list[list[tuple[str, float, str]]] = []
    for cap in sorted(caps, key=lambda c: c[1]):
        if groups and abs(py(groups[-1][0][1]) - py(cap[1])) < 2:
            groups[-1].append(cap)
        else:
            groups.append([cap])
    return groups


def _cap_label_positions(groups, py, top: float, gap: float = 12) -> list[tuple[list, float]]:
    """Each group's in-plot label just above its line, moved up where it would overlap the label below it."""
    out, floor = [], math.inf
    for group in groups:  # lowest value first: the lowest line is the furthest down
        y = min(py(group[0][1]) - 4, floor - gap)
        out.append((group, max(y, top + 10)))
        floor = y
    return out


def line_chart(
    title: str,
    series: list[dict[str, Any]],
    caps: list[tuple[str, float, str]],
    x_label: str,
    y_label: str = "cumulative ε",
    width: int = 495,
    height: int = 290,
) -> str:
    """An SVG line chart. series: {label, colour, points: [(x, y)], dashed, markers}; caps: (label, y, colour)."""
    left, right, top, bottom = 52, 138, 34, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s["points"]] or [1]
    ys = [y for s in series for _, y in s["points"]] + [c[1] for c in caps] or [1]
    x_max = max(max(xs), 1)
    y_max = _nice_max(max(ys) * 1.05)

    def px(x: float) -> float:
        return left + (x / x_max) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y / y_max) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}" class="chart">',
             f'<text x="{left}" y="18" class="chart-title">{html.escape(title)}</text>']
    for i in range(6):
        y = y_max * i / 5
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick y" text-anchor="end">{_fmt(y)}</text>')
    x_step = max(1, math.ceil(x_max / 10))
    for x in range(0, int(x_max) + 1, x_step):
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" class="tick x" text-anchor="middle">{x}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" class="axis-label x" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" class="axis-label y" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    legend_y = top + 4
    for group in _cap_groups(caps, py):
        # Caps at the same height (phase B's and C's are equal by construction) share one line, drawn in
        # alternating dashes of each colour, and one label naming them all, so no cap hides another.
        y = py(group[0][1])
        dash = 4
        for i, (_, _, colour) in enumerate(group):
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="cap" '
                         f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash} {dash * (len(group) - 1) + 2}" '
                         f'stroke-dashoffset="{-i * dash}"/>')
        for label, value, colour in group:
            parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 30}" y1="{legend_y}" '
                         f'y2="{legend_y}" stroke="{colour}" stroke-width="2" stroke-dasharray="2 3"/>')
            parts.append(f'<text x="{left + plot_w + 36}" y="{legend_y + 4}" class="legend">'
                         f'{html.escape(label)} {_fmt(value)}</text>')
            legend_y += 18
    for group, label_y in _cap_label_positions(_cap_groups(caps, py), py, top):
        labels = [label for label, _, _ in group]
        if len(labels) > 1 and all(label.endswith(" cap") for label in labels):
            names = " and ".join(label[:-4] for label in labels) + " caps"
        else:
            names = " and ".join(labels)
        parts.append(f'<text x="{left + 6}" y="{label_y:.1f}" class="cap-label" text-anchor="start">'
                     f'{html.escape(names)} {_fmt(group[0][1])}</text>')
    for s in series:
        points = [(0.0, 0.0)] + list(s["points"])
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        parts.append(f'<polyline points="{path}" fill="none" stroke="{s["colour"]}" stroke-width="2"{dash}/>')
        if s.get("markers", True):
            for x, y in s["points"]:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s["colour"]}"/>')
        parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 30}" y1="{legend_y}" y2="{legend_y}" '
                     f'stroke="{s["colour"]}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{left + plot_w + 36}" y="{legend_y + 4}" class="legend">{html.escape(s["label"])}</text>')
        legend_y += 18
    if not any(s["points"] for s in series):
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="tick" text-anchor="middle">'
                     f'no releases</text>')
    parts.append("</svg>")
    return "".join(parts)


def budget_bars(rows: list[tuple[str, float, float]], width: int = 1000, failed: set[str] | None = None) -> str:
    """Horizontal bars of spent vs remaining; rows are (label, spent, cap). The axis is the share of each bar's own
    cap (the total budget or a phase's share); a row whose label is in `failed` is marked as not verified."""
    failed = failed or set()
    label_w, right, row_h, top = 330, 230, 26, 44
    bar_w = width - label_w - right
    bottom = top + row_h * len(rows)
    height = bottom + 44
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="remaining privacy budget" class="chart">',
             '<text x="0" y="16" class="chart-title">Budget spent (dark) and remaining (light), PLD ε</text>']
    for i in range(5):
        x = label_w + bar_w * i / 4
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 15}" class="tick x" text-anchor="middle">{25 * i}%</text>')
    for i, (label, spent, cap) in enumerate(rows):
        y = top + i * row_h
        fraction = min(spent / cap, 1.0) if cap > 0 else 1.0
        colour = "#b03a48" if fraction >= 0.95 else "#1f5fa8"
        parts.append(f'<text x="{label_w - 10}" y="{y + 15}" class="tick y{" fail-label" if label in failed else ""}" '
                     f'text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="16" fill="#dfe7f1"/>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar_w * fraction:.1f}" height="16" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + bar_w + 8}" y="{y + 15}" class="legend">{_fmt(spent)} of {_fmt(cap)} '
                     f'({_fmt(max(cap - spent, 0))} left)'
                     + ('<tspan class="fail-label"> FAILED</tspan>' if label in failed else '') + '</text>')
    parts.append(f'<line x1="{label_w}" x2="{label_w + bar_w}" y1="{bottom}" y2="{bottom}" class="axis"/>')
    parts.append(f'<text x="{label_w + bar_w / 2}" y="{height - 6}" class="axis-label x" text-anchor="middle">'
                 f'share of the cap spent (the total budget, or the phase\'s share of it)</text>')
    parts.append(f'<text x="{label_w - 10}" y="{top - 6}" class="axis-label y" text-anchor="end">'
                 f'ledger · privacy unit · cap</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- HTML -----------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2733; margin: 0;
       background: #f4f6f9; line-height: 1.45; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 32px 0 10px; border-bottom: 1px solid #d5dbe3;
     padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #5b6877; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #d5dbe3; padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } td.nowrap { white-space: nowrap; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.refusal td { background: #fcefef; } tr.recovery td { background: #fff6e0; }
.ok { color: #1e7b34; font-weight: 600; } .fail { color: #b03a48; font-weight: 600; }
.banner { padding: 10px 14px; border-radius: 4px; margin: 14px 0; font-weight: 600; }
.banner.fail { background: #fbe3e6; border: 1px solid #b03a48; }
.banner.ok { background: #e3f4e7; border: 1px solid #1e7b34; }
.statement { background: #f7f9fc; border-left: 4px solid #1f5fa8; padding: 8px 14px; margin: 10px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.chart { background: #fff; border: 1px solid #e1e6ed; }
.chart-title { font-size: 13px; font-weight: 600; fill: #1d2733; }
.tick { font-size: 11px; fill: #5b6877; } .axis-label { font-size: 12px; fill: #3b4754; }
.cap-label { font-size: 10.5px; fill: #3b4754; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.fail-label { fill: #b03a48; font-weight: 600; }
.chart { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; }
td.id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11.5px; min-width: 7.5em; }
td.path code, td.path { overflow-wrap: anywhere; word-break: break-word; }
td.result { min-width: 9em; max-width: 22em; overflow-wrap: anywhere; }
tr.failed td { background: #fbe3e6; } .nb { white-space: nowrap; }
.legend { font-size: 11.5px; fill: #1d2733; }
.grid { stroke: #e6eaf0; stroke-width: 1; } .axis { stroke: #8a96a3; stroke-width: 1; }
code { font-size: 12px; background: #eef2f7; padding: 0 3px; }
ul { margin: 6px 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _time(entry: dict[str, Any]) -> str:
    return _e(str(entry.get("time", ""))[:19].replace("T", " "))


def _run_id(run_id: Any) -> str:
    """The whole run id (a prefix such as "phase-a-" names nothing), breakable after its hyphens."""
    return "-<wbr>".join(_e(part) for part in str(run_id or "").split("-")) or "—"


def _path(path: Any) -> str:
    """A file path that wraps after its slashes rather than anywhere."""
    return "/<wbr>".join(_e(part) for part in str(path).split("/"))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _num(value: Any, spec: str = ".4g") -> str:
    # Entries of a ledger that failed verification may hold anything; never let one break the report.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return "—" if value is None else _e(value)


def _points(entries: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    values = [e.get(name) for e in entries]
    return [(i + 1, v) for i, v in enumerate(values)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _phase_colours(ledgers: list[AuditedLedger]) -> dict[str, str]:
    phases: list[str] = []
    for ledger in ledgers:
        for phase in (ledger.replay.budget.shares if ledger.replay.budget else {}):
            if phase not in phases:
                phases.append(phase)
    return {p: PHASE_COLOURS[i % len(PHASE_COLOURS)] for i, p in enumerate(sorted(phases))}


def _mechanism_text(mechanism: dict[str, Any]) -> str:
    if not isinstance(mechanism, dict):
        return _e(mechanism)
    if mechanism.get("type") == "dp-sgd":
        return (f"DP-SGD σ={_num(mechanism.get('noise_multiplier'))}, q={_num(mechanism.get('sampling_rate'))}, "
                f"steps={_num(mechanism.get('steps'))}, C={_num(mechanism.get('clipping_norm'))}")
    if mechanism.get("type") == "gaussian":
        return (f"Gaussian σ={_num(mechanism.get('noise_multiplier'))}, Δ₂={_num(mechanism.get('l2_sensitivity'))}, "
                f"×{_num(mechanism.get('releases'))}")
    return _e(mechanism)


def _shared_text(entry: dict[str, Any]) -> str:
    noise = entry.get("noise")
    if not isinstance(noise, dict):
        return ""
    return (f"<br>shared across ≥ {_e(noise.get('min_sites'))} sites: own σ={_num(noise.get('site_noise_multiplier'))}, "
            f"worst-case ε after {_num(noise.get('worst_case_epsilon'))}")


def _delta_statement(delta: float, unit: str, releases: list[dict[str, Any]]) -> str:
    sizes = [e["population_size"] for e in releases if isinstance(e.get("population_size"), int)]
    noun = "patients" if unit == "patient-in-site" else "participating hospitals"
    if not sizes:
        return (f"<span class='nb'>δ = {delta:g}</span>. The releases did not record how many {noun} they covered (n), so δ cannot be "
                f"compared with 1/n here; δ should be well below 1/n.")
    n = max(sizes)
    ratio = (1 / n) / delta
    if delta < 1 / n:
        return (f"<span class='nb'>δ = {delta:g}</span> against <span class='nb'>1/n = {1 / n:.3g}</span> (n = {n:,} {noun}, the largest recorded): δ is "
                f"{ratio:,.0f} times smaller than 1/n, as it should be.")
    return (f"<span class='fail'><span class='nb'>δ = {delta:g}</span> is not below 1/n = {1 / n:.3g} (n = {n:,} {noun})</span>: a "
            f"mechanism could then reveal one {noun[:-1]}'s data outright with non-negligible probability.")


def _noise_statement(ledgers: list[AuditedLedger]) -> str:
    sources: dict[str, int] = {}
    for ledger in ledgers:
        for entry in ledger.releases():
            source = entry.get("noise_source", UNSPECIFIED_NOISE_SOURCE)
            sources[source] = sources.get(source, 0) + 1
    items = "".join(
        f"<li>{_e(src)} — {count} release{'s' if count != 1 else ''}"
        f"{' (the releasing code did not say)' if src == UNSPECIFIED_NOISE_SOURCE else ''}</li>"
        for src, count in sorted(sources.items())
    ) or "<li>no releases</li>"
    if importlib.util.find_spec("torchcsprng") is None:
        secure = ("<b>Opacus secure mode is unavailable</b> in this installation: it needs <code>torchcsprng</code>, "
                  "which has not been maintained since 2021 and does not install with current PyTorch. Noise is "
                  "therefore drawn from a non-cryptographic pseudo-random generator. The accounting assumes ideal "
                  "Gaussian noise; attacks on floating-point or pseudo-random sampling are not mitigated.")
    else:
        secure = ("<code>torchcsprng</code> is installed, so Opacus secure mode is available; whether a release "
                  "used it is stated by its noise source above.")
    return f"<p>Noise sources declared by the releasing code:</p><ul>{items}</ul><p>{secure}</p>"


def _site_section(ledger: AuditedLedger, colours: dict[str, str]) -> str:
    replay, budget = ledger.replay, ledger.replay.budget
    out = [f"<h2>Site {_e(ledger.label)}</h2>",
           f"<p class='meta'>Ledger <code>{_e(ledger.path)}</code> ({_e(ledger.kind)}); {_e(ledger.key_note)}</p>"]
    if not ledger.verified:
        out.append("<div class='banner fail'>This ledger FAILED verification; the figures below are as recorded "
                   "and must not be relied on.<br>" + "<br>".join(_e(p) for p in ledger.problems[:10]) + "</div>")
    if budget is None:
        out.append("<p class='fail'>No valid open entry: the budget is unknown.</p>")
        return "".join(out)
    for unit in ledger.units() or ["patient-in-site"]:
        releases = ledger.releases(unit)
        spent = replay.state.spent(unit)
        out.append(f"<h3>{_e(UNIT_TITLES[unit]).capitalize()}</h3>")
        # Only the enforced PLD figure is drawn against the budget line: the looser RDP bound can lie above
        # the budget without anything having been overspent, and a line crossing it would read as an overrun.
        # It is in the tables, labelled as the looser bound.
        total_series = [
            {"label": "ε (PLD, enforced)", "colour": "#1d2733", "points": _points(releases, "epsilon")},
        ]
        phase_series = []
        for phase in budget.shares:
            in_phase = [e for e in releases if e.get("phase") == phase]
            phase_series.append({"label": phase, "colour": colours[phase],
                                 "points": _points(in_phase, "phase_epsilon")})
        out.append("<div class='charts'>")
        out.append(line_chart(f"{ledger.label}: ε over releases ({unit})", total_series,
                              [("total budget", budget.epsilon_total, "#b03a48")], "release number"))
        out.append(line_chart(f"{ledger.label}: ε per phase ({unit})", phase_series,
                              [(f"{p} cap", budget.phase_cap(p), colours[p]) for p in budget.shares],
                              "release number within the phase"))
        out.append("</div>")
        unit_phrase = ("adding or removing all records of any one patient of this hospital" if unit == "patient-in-site"
                       else "adding or removing this hospital's entire contribution")
        out.append(
            f"<div class='statement'><p><b>Guarantee.</b> Everything site {_e(ledger.site_id)} released "
            f"under this privacy unit, over all phases and runs in this ledger ({_plural(len(releases), 'release')}), is "
            f"(<b>ε = {spent.pld:.4g}</b>, <span class='nb'>δ = {budget.delta:g}</span>)-differentially private with respect to "
            f"{unit_phrase} (PLD accountant: the figure the budget is enforced on; the Rényi-DP accountant's looser "
            f"bound, ε ≤ {spent.rdp:.4g}, is shown for comparison only and is not enforced). Budget: ε ≤ "
            f"{budget.epsilon_total:g} in total, {', '.join(f'{p} ≤ {budget.phase_cap(p):.3g}' for p in budget.shares)}"
            f"; {replay.state.remaining(unit):.4g} remains.</p>"
            f"<p>{_delta_statement(budget.delta, unit, releases)}</p>{_shared_noise_statement(ledger, unit)}</div>"
        )
    return "".join(out)


def _shared_noise_statement(ledger: AuditedLedger, unit: str) -> str:
    text = ledger.shared_noise(unit)
    if text is None:
        return ""
    return (f"<p><b>Shared noise.</b> {_e(text)}. Trust assumption: {_e(TRUST_ASSUMPTION)}</p>")


def _entries_table(ledgers: list[AuditedLedger]) -> str:
    rows = []
    for ledger in ledgers:
        for e in ledger.replay.entries:
            kind = e.get("kind")
            if kind not in ("release", "refusal", "recovery"):
                continue
            if kind == "recovery":
                rows.append(f"<tr class='recovery'><td class='nowrap'>{_e(ledger.label)}</td>"
                            f"<td class='num'>{_e(e.get('seq'))}</td><td class='nowrap'>{_time(e)}</td><td>recovery</td><td colspan='8'>torn last line of "
                            f"{_e(e.get('torn_bytes'))} bytes removed, kept as {_e(e.get('torn_saved_as'))}</td></tr>")
                continue
            shown = e if kind == "release" else (e.get("requested") if isinstance(e.get("requested"), dict) else {})
            eps, eps_rdp = shown.get("epsilon"), shown.get("epsilon_rdp")
            note = "" if kind == "release" else f" (refused: over the {_e(e.get('limit'))} cap {_num(e.get('cap'), '.3g')})"
            rows.append(
                f"<tr class='{kind}'><td class='nowrap'>{_e(ledger.label)}</td><td class='num'>{_e(e.get('seq'))}</td>"
                f"<td class='nowrap'>{_time(e)}</td><td>{kind}{note}</td>"
                f"<td class='id'>{_run_id(e.get('run_id'))}</td>"
                f"<td>{_e(e.get('phase'))}</td><td class='num'>{_e(e.get('round'))}</td>"
                f"<td class='nowrap'>{_e(e.get('privacy_unit'))}</td><td>{_mechanism_text(e.get('mechanism'))}{_shared_text(e)}</td>"
                f"<td class='num'>{_num(eps)}</td><td class='num'>{_num(eps_rdp)}</td>"
                f"<td class='num nowrap'>{_num(e.get('delta'), 'g')}</td></tr>"
            )
    head = ("<tr><th>Site</th><th>#</th><th>Time (UTC)</th><th>Entry</th><th>Run</th><th>Phase</th><th>Round</th>"
            "<th>Unit</th><th>Mechanism</th><th>ε after (PLD, enforced)</th>"
            "<th>RDP bound after (looser, not enforced)</th><th>δ</th></tr>")
    body = "".join(rows) or "<tr><td colspan='12'>no releases</td></tr>"
    return (f"<div class='scroll'><table>{head}{body}</table></div><p class='meta'>For refusals, “ε after” is what the refused release "
            f"would have reached; the cumulative ε did not change.</p>")


# -- membership inference --------------------------------------------------------------------------

def membership_rows(audits: list[dict[str, Any]], ledgers: list[AuditedLedger]) -> list[dict[str, Any]]:
    """One row per site, artifact and attack of the sites' `pmlm audit membership` results.

    ε and the bound are re-derived here from the verified ledger in this report (the releases the
    site named, checked by sequence number and signature); a result whose releases the ledger does
    not hold, or whose ledger is not in the report, says so instead of being trusted silently.
    """
    by_site = {}
    for ledger in ledgers:
        if ledger.verified and ledger.replay.budget is not None:
            by_site.setdefault(ledger.site_id, ledger)  # the first given: a site ledger before a copy
    rows = []
    for audit in audits:
        site = str(audit.get("site_id"))
        ledger = by_site.get(site)
        for artifact in audit.get("artifacts", []):
            epsilon, delta, check, untied = artifact.get("epsilon"), artifact.get("delta"), "", ""
            named = artifact.get("ledger_releases") or []
            if ledger is not None and named:
                found, problems = tied_releases(ledger.replay.entries, named)
                delta = ledger.replay.budget.delta
                if problems:
                    epsilon, untied = None, problems[0]
                else:
                    epsilon, check = composed_epsilon(found, delta, ledger.replay.settings), "ε re-computed from the verified ledger"
            elif named:
                check = "ε as the site computed it: its verified ledger is not in this report"
            bound = advantage_bound(epsilon, delta) if epsilon is not None else None
            for attack in artifact.get("attacks") or [{}]:
                if untied:
                    text, consistent = f"not tied to the ledger: {untied}", False
                elif attack:
                    text, consistent = verdict(attack, bound)
                else:
                    text, consistent = "not measured", True
                rows.append({"site_id": site, "artifact": artifact.get("artifact"), "run_id": artifact.get("run_id"),
                             "epsilon": epsilon, "delta": delta, "bound": bound, "ledger_check": check,
                             "note": artifact.get("note", ""), **attack, "verdict": text, "consistent": consistent})
    return rows


def _empirical_epsilon(row: dict[str, Any]) -> float | None:
    interval = row.get("advantage_ci")
    if not isinstance(interval, (list, tuple)) or not isinstance(interval[0], (int, float)):
        return None
    return epsilon_lower_bound(max(interval[0], 0.0), row.get("delta") or 0.0)


def _ci(value: Any, interval: Any) -> str:
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return _num(value, ".3f")
    return f"{_num(value, '.3f')} <span class='meta'>({_num(interval[0], '.3f')}–{_num(interval[1], '.3f')})</span>"


def membership_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{_e(r['site_id'])}</td><td>{_e(r['artifact'])}</td>"
        f"<td class='id'>{_run_id(r.get('run_id'))}</td>"
        f"<td class='num'>{_num(r['epsilon'])}</td><td class='num'>{_num(r['bound'], '.3f')}</td>"
        f"<td>{_e(r.get('attack', '—'))}</td>"
        f"<td class='num'>{_e(r.get('members', '—'))} / {_e(r.get('non_members', '—'))}</td>"
        f"<td class='num'>{_num(r.get('advantage'), '.3f')} <span class='meta'>(chance "
        f"{_num(r.get('null_advantage'), '.3f')})</span></td>"
        f"<td class='num'>{_ci(r.get('held_out_advantage'), r.get('advantage_ci'))}</td>"
        f"<td class='num'>{_ci(r.get('auc'), r.get('auc_ci'))}</td>"
        f"<td class='num'>{_num(_empirical_epsilon(r), '.2f')}</td>"
        f"<td><span class='{'ok' if r['consistent'] else 'fail'}'>{_e(r['verdict'])}</span>"
        f"<br><span class='meta'>{_e('; '.join(filter(None, [r['ledger_check'], r['note']])))}</span></td></tr>"
        for r in rows)
    return f"""<h2>Membership inference</h2>
<div class="statement"><p>Each site attacked its own released artifacts with its own patients
(<code>pmlm audit membership SITE_DIR</code>): members are the patients an artifact was built from, non-members
the site's held-out patients. An attack's <b>advantage</b> is TPR − FPR, how much more often it says “member” for
members than for non-members; for an artifact whose ledger releases compose to (ε, δ), no attack can exceed
<b>(e<sup>ε</sup> − 1 + 2δ) / (e<sup>ε</sup> + 1)</b>. A measured advantage above the bound means the release
leaks more than its ledger says; one below it is what DP predicts, and only a lower bound on leakage (these
attacks are simple; stronger ones may find more).</p>
<p>“Best threshold” is the usual figure, the best TPR − FPR over all thresholds on the same patients; it is
optimistic, and “chance” is what it reads with member labels shuffled. “Held out” chooses the threshold on one
half of the patients and measures it on the other; its {_e(round(CONFIDENCE * 100))}% interval carries the
verdict. The AUC's interval is a bootstrap. “Empirical ε ≥” is the smallest ε whose bound admits the lower end
of the held-out interval: what the attack proves about the release, to set beside the ledger's ε.</p></div>
<table><tr><th>Site</th><th>Artifact</th><th>Run</th><th>ε</th><th>Bound</th><th>Attack</th><th>Members / held out</th>
<th>Advantage, best threshold</th><th>Advantage, held out (CI)</th><th>AUC (CI)</th><th>Empirical ε ≥</th>
<th>Verdict</th></tr>{body}</table>
"""


def _verification_row(ledger: AuditedLedger) -> str:
    if ledger.verified:
        result, row = "<span class='ok'>verified</span>", "<tr>"
    else:
        more = len(ledger.problems) - 1
        result = (f"<span class='fail'>FAILED: {_e(ledger.problems[0])}</span>"
                  + (f" <span class='meta'>(and {_plural(more, 'more problem')}: see its section)</span>" if more else ""))
        row = "<tr class='failed'>"
    return (f"{row}<td class='path'><code>{_path(ledger.path)}</code></td><td>{_e(ledger.kind)}</td>"
            f"<td>{_e(ledger.site_id)}</td><td class='num'>{len(ledger.replay.entries)}</td>"
            f"<td class='path'>{_e(ledger.key_note)}</td><td class='result'>{result}</td></tr>")


def render_html(ledgers: list[AuditedLedger], generated_at: str | None = None,
                membership: list[dict[str, Any]] | None = None) -> str:
    generated_at = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    colours = _phase_colours(ledgers)
    all_ok = all(ledger.verified for ledger in ledgers)
    verification_rows = "".join(_verification_row(l) for l in ledgers)
    summary_rows = []
    bars = []
    failed_bars: set[str] = set()
    for ledger in ledgers:
        replay, budget = ledger.replay, ledger.replay.budget
        status = ("<span class='ok'>verified</span>" if ledger.verified else
                  "<span class='fail'>FAILED: figures as recorded, not to be relied on</span>")
        if budget is None:
            summary_rows.append(f"<tr class='failed'><td>{_e(ledger.label)}</td><td>—</td>"
                                f"<td colspan='7'>no valid open entry: the budget is unknown</td><td>{status}</td></tr>")
            continue
        for unit in ledger.units() or ["patient-in-site"]:
            spent = replay.state.spent(unit)
            summary_rows.append(
                f"<tr{'' if ledger.verified else ' class=failed'}><td>{_e(ledger.label)}</td><td class='nowrap'>{_e(unit)}</td>"
                f"<td class='num'>{spent.pld:.4g}</td>"
                f"<td class='num'>{spent.rdp:.4g}</td><td class='num nowrap'>{budget.delta:g}</td>"
                f"<td class='num'>{budget.epsilon_total:g}</td><td class='num'>{replay.state.remaining(unit):.4g}</td>"
                f"<td class='num'>{len(ledger.releases(unit))}</td>"
                f"<td class='num'>{sum(1 for e in ledger.refusals() if e.get('privacy_unit') == unit)}</td>"
                f"<td class='result'>{status}</td></tr>"
            )
            bars.append((f"{ledger.label} · {unit} · total", spent.pld, budget.epsilon_total))
            for phase in budget.shares:
                bars.append((f"{ledger.label} · {unit} · {phase}", replay.state.spent(unit, phase).pld,
                             budget.phase_cap(phase)))
            if not ledger.verified:
                failed_bars.update(label for label, _, _ in bars[-1 - len(budget.shares):])
    settings = sorted({f"{l.replay.settings.pld_value_discretization_interval:g}" for l in ledgers if l.replay.settings})
    versions = sorted({e.get("accountant") for l in ledgers for e in l.replay.entries if e.get("accountant")})
    banner = ("<div class='banner ok'>All ledgers verified: hash chains, signatures and canonical bytes intact, "
              "cumulative ε never decreases, every ε re-computed from the recorded mechanisms matches.</div>"
              if all_ok else
              f"<div class='banner fail'>{sum(1 for l in ledgers if not l.verified)} of {len(ledgers)} "
              f"ledger{'s' if len(ledgers) != 1 else ''} FAILED verification: "
              + "; ".join(f"{_e(l.label)} ({_e(l.problems[0])})" for l in ledgers if not l.verified)
              + ". Their figures below are as recorded and must not be relied on.</div>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PMLM privacy audit report</title>
<style>{CSS}</style></head><body><main>
<h1>PMLM privacy audit report</h1>
<p class="meta">Generated {_e(generated_at)} · {len(ledgers)} ledger{'s' if len(ledgers) != 1 else ''} ·
re-computed with {_e(ACCOUNTANT)}</p>
{banner}
<h2>Verification</h2>
<div class="scroll"><table><tr><th>Ledger</th><th>Kind</th><th>Site</th><th>Entries</th><th>Signing key</th>
<th>Result</th></tr>{verification_rows}</table></div>
<h2>Summary</h2>
<table><tr><th>Site</th><th>Privacy unit</th><th>ε (PLD, enforced)</th><th>RDP bound (looser, not enforced)</th>
<th>δ</th><th>Budget ε</th>
<th>Remaining ε</th><th>Releases</th><th>Refusals</th><th>Verification</th></tr>{''.join(summary_rows)}</table>
{budget_bars(bars, failed=failed_bars) if bars else ''}
<h2>What is guaranteed, and under which assumptions</h2>
<div class="statement">
<p><b>Privacy units.</b> Record-level guarantees protect one patient (all of her records) within one hospital;
hospital-level guarantees protect one hospital's whole contribution. They are separate guarantees: releases of
one unit are never composed with the other's, and each has its own budget.</p>
<p><b>Trust model.</b> Each hospital is the custodian of its records and is trusted to clip and add noise
correctly before anything leaves it; its raw records and per-patient values never leave. The coordinator is
honest-but-curious; other hospitals see only global artifacts. The guarantees bound what any of them, or anyone
who later sees released or aggregated artifacts, can learn about one unit. They say nothing about on-site
processing, which never leaves the hospital.</p>
<p><b>Composition.</b> Every release of a site is composed in ledger order with the privacy-loss-distribution
(PLD) accountant of {_e(', '.join(versions) or ACCOUNTANT)} (pessimistic discretisation interval
{_e(', '.join(settings) or '?')}); that ε is the one reported and the one the budget is enforced on. The Rényi-DP
accountant of the same library runs alongside as a second, looser bound; it is not enforced, so an RDP figure
above the budget is not an overrun (the tables show it, the budget charts do not). Neighbouring datasets differ by adding
or removing one unit; DP-SGD is accounted as Poisson-sampled. A release that would exceed the total budget or
its phase's share is refused before any noise is drawn, and the refusal is itself a ledger entry.</p>
<p><b>Random numbers.</b></p>{_noise_statement(ledgers)}
</div>
{''.join(_site_section(l, colours) for l in ledgers)}
{membership_section(membership_rows(membership or [], ledgers))}
<h2>Every release</h2>
{_entries_table(ledgers)}
</main></body></html>
"""


def write_report(ledgers: list[AuditedLedger], out_dir: Path, membership: list[dict[str, Any]] | None = None) -> Path:
    """`membership`: the sites' `pmlm audit membership` results, shown in their own section."""
    return write_atomic(out_dir / "privacy_report.html", render_html(ledgers, membership=membership))
