"""The reproduction report: one self-contained HTML page (inline SVG, opens offline) and its JSON.

Every figure is shown with its 95% bootstrap interval over patients and its number of points where the report
carries them; a paired difference whose interval contains 0 reads "no difference", one over fewer than 10 patients
"too few patients to tell". Keys an older report.json lacks (per-site figures, on-site decisions, intervals,
patient counts) are said to be missing, never an error.

Re-render a page from a report: `python -m pmlm.reports.demo OUT/report.json [OUT/report.html]`.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

from pmlm.common.atomic import write_atomic
from pmlm.common.metrics import paired_verdict
from pmlm.common.profiles import load_profile

COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac"]

# What each prompt variant of the guidance evaluation is, in words (pipeline/evaluation.py).
VARIANT_LABELS = {
    "general": "general (no patient data)",
    "summary_only": "summary only",
    "self": "self",
    "peer": "peer",
    "self_peer": "self+peer (initial)",
    "pmlm_consortium": "consortium DP policy",
    "pmlm": "PMLM (what the site uses)",
    "oracle": "oracle (ceiling)",
}
RECOMMENDER_LABELS = {"local_only": "local only", "federated_dp": "federated DP", "adapted": "adapted",
                      "timing": "timing floor"}
PAIR_LABELS = {"pmlm_vs_self_peer": "PMLM − initial (self+peer)",
               "pmlm_vs_pmlm_consortium": "PMLM − consortium DP policy",
               "pmlm_vs_general": "PMLM − general"}
RISK_NOTE = ("Risk recall (the share of the patient's upcoming risk conditions{examples} that the answer names) is "
             "undefined at a point with no risk condition in its horizon (client/reward.py).")


def risk_note_for(profile_name: str | None) -> str:
    """RISK_NOTE naming a few of the report's task profile's risk conditions (none when it cannot be loaded)."""
    try:
        profile = load_profile(profile_name) if profile_name else None
    except (ValueError, OSError):
        profile = None
    if profile is None or not profile.risks:
        return RISK_NOTE.format(examples="")
    names = [profile.name_of(c) for c in profile.risk_ids][:3]
    return RISK_NOTE.format(examples=f", such as {', '.join(names[:-1])} or {names[-1]}," if len(names) > 1
                            else f", such as {names[0]},")


# -- numbers ---------------------------------------------------------------------------------------------------

def _num_ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval_ok(iv) -> bool:
    return isinstance(iv, (list, tuple)) and len(iv) == 2 and all(_num_ok(v) for v in iv)


def _fmt(x, spec: str = ".3f") -> str:
    if isinstance(x, float):
        return format(x, spec) if _num_ok(x) else "–"
    return "–" if x is None else html.escape(str(x))


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def _iv(iv, signed: bool = False) -> str:
    """An interval as text: 0.782–0.809, or −0.025 to +0.145 for a difference."""
    if not _interval_ok(iv):
        return ""
    if signed:
        return f"{_signed(iv[0])} to {_signed(iv[1])}"
    return f"{iv[0]:.3f}–{iv[1]:.3f}"


def verdict(difference, interval, patients: int | None = None) -> tuple[str, str]:
    """(css class, words) of a paired difference (common/metrics.paired_verdict): a gain or a loss only where its
    interval excludes 0 and enough patients stand behind it."""
    words = paired_verdict(difference, interval, patients)
    return {"gain": "gain", "loss": "loss", "no difference": "same"}.get(words, "none"), words


def _cell(row: dict | None, key: str, n_key: str | None = None) -> str:
    """A figure with its interval under it (and its n where asked): '–' where the report lacks it."""
    if not isinstance(row, dict) or not _num_ok(row.get(key)):
        return "<td class='num'>–</td>"
    iv = _iv(row.get(f"{key}_interval"))
    n = f"<span class='ci'>n {row[n_key]}</span>" if n_key and row.get(n_key) is not None else ""
    return (f"<td class='num'><span class='v'>{row[key]:.3f}</span>"
            + (f"<span class='ci'>{iv}</span>" if iv else "<span class='ci'>no interval</span>") + n + "</td>")


def _difference_cell(pair: dict | None, key: str, ratio: dict | None = None, ratio_key: str | None = None) -> str:
    """A paired difference: 'gain' / 'loss' / 'no difference' first, then the figure and its interval."""
    if not isinstance(pair, dict) or not _num_ok(pair.get(key)):
        return "<td class='num'>–</td>"
    diff, iv = pair[key], pair.get(f"{key}_interval")
    css, words = verdict(diff, iv, pair.get("patients"))
    ratio_text = ""
    if isinstance(ratio, dict) and _num_ok(ratio.get(ratio_key)):
        riv = ratio.get(f"{ratio_key}_interval")
        ratio_text = (f"<span class='ci'>×{ratio[ratio_key]:.2f}"
                      + (f" ({riv[0]:.2f}–{riv[1]:.2f})" if _interval_ok(riv) else "") + "</span>")
    return (f"<td class='num diff {css}'><span class='tag {css}'>{words}</span><span class='ci'>{_signed(diff)}</span>"
            + (f"<span class='ci'>{_iv(iv, signed=True)}</span>" if _interval_ok(iv) else "") + ratio_text + "</td>")


# -- charts: every one with ticks and labels on both axes ----------------------------------------------------

def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top`."""
    top = top if _num_ok(top) and top > 0 else 1.0
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw * 0.999)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _tick_text(v: float) -> str:
    return f"{v:g}"


def hbar_chart(rows: list[tuple[str, float, list | None]], title: str, x_label: str, y_label: str,
               max_value: float | None = None, width: int = 640) -> str:
    """Horizontal bars, one per (label, value, interval or None): the interval as a whisker, ticks on the value
    axis, the categories as the other axis' tick labels."""
    rows = [(k, v, iv) for k, v, iv in rows if _num_ok(v)]
    if not rows:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    label_w, right, top, row_h = 200, 70, 30, 24
    plot_w = width - label_w - right
    highest = max(max(v, iv[1] if _interval_ok(iv) else v) for _, v, iv in rows)
    ticks = _ticks(max_value if max_value else highest)
    x_max = ticks[-1]
    bottom = top + row_h * len(rows)
    height = bottom + 42

    def sx(v: float) -> float:
        return label_w + max(0.0, min(v, x_max)) / x_max * plot_w

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for t in ticks:
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{bottom}" stroke="#e6e6e6"/>'
                     f'<text class="tick x" x="{sx(t):.1f}" y="{bottom + 14}" font-size="11" fill="#555" '
                     f'text-anchor="middle">{_tick_text(t)}</text>')
    for i, (k, v, iv) in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text class="tick y" x="{label_w - 8}" y="{y + 16}" font-size="12" text-anchor="end">'
                     f'{html.escape(k)}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{max(1.0, sx(v) - label_w):.1f}" height="16" '
                     f'fill="{COLORS[i % len(COLORS)]}"/>')
        end = sx(v)
        if _interval_ok(iv):
            lo, hi, mid = sx(iv[0]), sx(iv[1]), y + 12
            parts.append(f'<path d="M{lo:.1f},{mid}H{hi:.1f}M{lo:.1f},{mid - 5}V{mid + 5}M{hi:.1f},{mid - 5}'
                         f'V{mid + 5}" stroke="#222" stroke-width="1.2" fill="none"/>')
            end = max(end, hi)
        parts.append(f'<text x="{end + 5:.1f}" y="{y + 16}" font-size="11">{v:.3f}</text>')
    parts.append(f'<line x1="{label_w}" x2="{label_w}" y1="{top}" y2="{bottom}" stroke="#333"/>'
                 f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{bottom}" y2="{bottom}" stroke="#333"/>'
                 f'<text class="axis-label x" x="{label_w + plot_w / 2}" y="{height - 6}" font-size="12" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text class="axis-label y" transform="translate(12 {(top + bottom) / 2}) rotate(-90)" '
                 f'font-size="12" text-anchor="middle">{html.escape(y_label)}</text></svg>')
    return "".join(parts)


def line_chart(points: list[tuple[float, float, list | None]], title: str, xlabel: str, ylabel: str,
               width: int = 600, height: int = 280) -> str:
    """Points joined in x order, each with its interval as an error bar; ticks at every x and round y ticks."""
    pts = sorted((x, y, iv) for x, y, iv in points if _num_ok(x) and _num_ok(y))
    if not pts:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    xs = [p[0] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    highest = max(max(y, iv[1] if _interval_ok(iv) else y) for _, y, iv in pts)
    ticks = _ticks(highest * 1.1)
    y_max = ticks[-1]
    left, right, top, bottom = 62, width - 30, 30, height - 44

    def sx(x):
        return left + 15 + (x - x0) / (x1 - x0) * (right - left - 30)

    def sy(y):
        return bottom - max(0.0, min(y, y_max)) / y_max * (bottom - top)

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for t in ticks:
        parts.append(f'<line x1="{left}" x2="{right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e6e6e6"/>'
                     f'<text class="tick y" x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" fill="#555" '
                     f'text-anchor="end">{_tick_text(t)}</text>')
    for x in dict.fromkeys(xs):
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#333"/>'
                     f'<text class="tick x" x="{sx(x):.1f}" y="{bottom + 16}" font-size="11" fill="#555" '
                     f'text-anchor="middle">{x:g}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y, _) in enumerate(pts))
    parts.append(f'<path d="{path}" fill="none" stroke="{COLORS[0]}" stroke-width="2"/>')
    for x, y, iv in pts:
        if _interval_ok(iv):
            lo, hi, cx = sy(iv[0]), sy(iv[1]), sx(x)
            parts.append(f'<path class="interval" d="M{cx:.1f},{lo:.1f}V{hi:.1f}M{cx - 5:.1f},{lo:.1f}H{cx + 5:.1f}'
                         f'M{cx - 5:.1f},{hi:.1f}H{cx + 5:.1f}" stroke="#222" stroke-width="1.2" fill="none"/>')
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{COLORS[0]}"/>'
                     f'<text x="{sx(x) + 8:.1f}" y="{sy(y) + 4:.1f}" font-size="11">{y:.3f}</text>')
    parts.append(f'<text class="axis-label x" x="{(left + right) / 2}" y="{height - 6}" font-size="12" '
                 f'text-anchor="middle">{html.escape(xlabel)}</text>'
                 f'<text class="axis-label y" transform="translate(14 {(top + bottom) / 2}) rotate(-90)" '
                 f'font-size="12" text-anchor="middle">{html.escape(ylabel)}</text></svg>')
    return "".join(parts)


# -- tables ----------------------------------------------------------------------------------------------------

def table(rows: dict[str, dict], columns: list[str], labels: dict[str, str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
    body = "".join("<tr><td>" + html.escape((labels or {}).get(name, name)) + "</td>"
                   + "".join(f"<td class='num'>{_fmt(r.get(c))}</td>" for c in columns)
                   + "</tr>" for name, r in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 6px;text-align:right;
vertical-align:top}td:first-child,th:first-child{text-align:left}th{background:#f3f5f8}
thead th{text-align:center}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:8px;font-size:12px}.note{color:#555;font-size:13px}
details{margin:6px 0}.scroll{overflow-x:auto}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.v{display:block;font-weight:600}.ci{display:block;font-size:11px;color:#666}
.tag{display:block;font-weight:600}.tag.gain{color:#1e7b34}.tag.loss{color:#b03a48}.tag.same{color:#555}
.tag.none{color:#888;font-weight:normal}
table.sites td.kept{text-align:left;white-space:normal;min-width:260px;max-width:320px;font-size:12px}
table.sites th{font-size:13px}table.sites td.site{min-width:150px;max-width:190px}
table.sites .why{color:#666}table.sites tr.pooled td{border-top:2px solid #888;background:#fafafa}
.notice{background:#fff8e1;border:1px solid #e0c46c;padding:8px 12px;font-size:13px}
svg.chart{display:block;margin:4px 0 12px;max-width:100%;height:auto}"""


def _budget(sites: dict) -> float | None:
    budgets = {v.get("budget") for v in sites.values()}
    return budgets.pop() if len(budgets) == 1 and isinstance(next(iter(budgets)), (int, float)) else None


def _budget_title(sites: dict) -> str:
    budget = _budget(sites)
    return ("ε spent per site (PLD, enforced)" if budget is None
            else f"ε spent per site (PLD, enforced); the axis ends at the budget, ε = {budget:g}")


def _sites(report: dict) -> list[str]:
    """Every site any per-site key names, in the run's order (the privacy table lists the sites as run)."""
    names: dict[str, None] = {}
    rbs = report.get("recommender_by_site") or {}
    on_site = report.get("on_site") or {}
    for source in ((report.get("privacy") or {}).get("sites") or {}, rbs.get("sites") or {},
                   report.get("guidance_by_site") or {}, on_site.get("prompt_policy") or {},
                   on_site.get("recommender") or {}):
        names.update(dict.fromkeys(source))
    return list(names)


def _recommender_kept(manifest: dict | None, adaptation: dict | None) -> tuple[str, str]:
    """(what the site's recommender is, why) from the adaptation manifest (on_site) or its summary (per site)."""
    m = manifest if isinstance(manifest, dict) else adaptation if isinstance(adaptation, dict) else None
    if not m or not m.get("choice"):
        return "consortium model", "no on-site adaptation recorded"
    choice, blend, epochs = m.get("choice"), m.get("blend"), m.get("epochs")
    if choice == "fine_tuned":
        what = f"fine-tuned on site (epoch {epochs})"
    elif choice == "blend":
        what = (f"blend, {blend:.0%} fine-tuned (epoch {epochs})" if _num_ok(blend) else "blend")
    else:
        what = "consortium model"
    why = m.get("reason") or ""
    validation = m.get("validation") if isinstance(m.get("validation"), dict) else {}
    key = {"fine_tuned": f"epoch {epochs}", "blend": f"blend {blend:g}" if _num_ok(blend) else ""}.get(choice)
    chosen, base = validation.get(key) if key else None, validation.get("consortium")
    if not why and isinstance(chosen, dict) and isinstance(base, dict) and _num_ok(chosen.get("recall@5")) \
            and _num_ok(base.get("recall@5")):
        why = (f"validation Recall@5 {chosen['recall@5']:.3f} against the consortium model's "
               f"{base['recall@5']:.3f} on {m.get('val_points', '?')} points")
    elif not why:
        why = f"chosen on {m.get('val_points', '?')} validation points"
    return what, why


def _policy_kept(decision: dict | None, refined_run: bool) -> tuple[str, str]:
    if not isinstance(decision, dict):
        return "consortium DP policy", ("on-site refinement was not run" if not refined_run
                                        else "no refinement recorded for this site")
    policy = decision.get("policy")
    what = {"site-refined": "site-refined policy", "consortium": "consortium DP policy"}.get(policy, str(policy))
    return what, str(decision.get("reason") or "")


def site_table(report: dict) -> str:
    """Rows: every site and the pool; recommender local_only / federated_dp / adapted Recall@5 and the paired
    adapted − local_only; guidance initial / consortium policy / PMLM F1 and the paired PMLM − initial; what
    each site kept on-site and why."""
    rbs = report.get("recommender_by_site")
    gbs = report.get("guidance_by_site")
    paired = (report.get("guidance_paired") or {}).get("pmlm_vs_self_peer") or {}
    on_site = report.get("on_site")
    if rbs is None and gbs is None and on_site is None:
        return ("<p class='note'>This report has no per-site figures (it predates <code>recommender_by_site</code>, "
                "<code>guidance_by_site</code> and <code>on_site</code>); run <code>pmlm evaluate</code> again for "
                "them.</p>")
    on_site = on_site or {}
    policies, adaptations = on_site.get("prompt_policy") or {}, on_site.get("recommender") or {}
    sites = _sites(report)
    rsites = (rbs or {}).get("sites") or {}
    rows = []
    for site in [*sites, None]:
        pooled = site is None
        rec = (rbs or {}).get("pooled") if pooled else rsites.get(site)
        gui = (report.get("guidance") if pooled else (gbs or {}).get(site)) or {}
        pair = paired if pooled else (paired.get("by_site") or {}).get(site)
        rec = rec or {}
        local = rec.get("local_only") if isinstance(rec.get("local_only"), dict) else None
        n_rec = next((r for r in (local, rec.get("adapted"), rec.get("federated_dp")) if isinstance(r, dict)), None)
        rec_n = (f"Recall@5: n {n_rec.get('points', '?')} points, {n_rec.get('patients', '?')} patients"
                 if n_rec else "Recall@5: no figures")
        g_rows = [gui.get(v) for v in ("self_peer", "pmlm_consortium", "pmlm")]
        counts = {r.get("points") for r in g_rows if isinstance(r, dict) and r.get("points") is not None}
        if len(counts) == 1:
            g_n, cell_n = f"F1: n {counts.pop()} points, one per patient", None
        else:  # the variants were scored on different numbers of points (or say none): each cell says its own
            g_n, cell_n = ("F1: n in each cell" if counts else "F1: no point counts"), "points"
        n_lines = f"<span class='ci'>{rec_n}</span><span class='ci'>{g_n}</span>"
        if pooled:
            kept_site = sum(1 for s in sites if _recommender_kept(adaptations.get(s), (rsites.get(s) or {})
                                                                  .get("adaptation"))[0] != "consortium model")
            kept_policy = sum(1 for s in sites if (policies.get(s) or {}).get("policy") == "site-refined")
            kept = (f"<td class='kept'>adapted recommender at {kept_site} of {len(sites)} sites; site-refined "
                    f"prompt policy at {kept_policy} of {len(sites)}</td>")
            name = f"<td class='site'><b>pooled</b> (every site's test points){n_lines}</td>"
        else:
            r_what, r_why = _recommender_kept(adaptations.get(site), rsites.get(site, {}).get("adaptation"))
            p_what, p_why = _policy_kept(policies.get(site), bool(policies))
            kept = (f"<td class='kept'><b>Recommender:</b> {html.escape(r_what)} <span class='why'>— "
                    f"{html.escape(r_why)}</span><br><b>Prompt:</b> {html.escape(p_what)} <span class='why'>— "
                    f"{html.escape(p_why)}</span></td>")
            name = f"<td class='site'><b>{html.escape(site)}</b>{n_lines}</td>"
        rows.append(
            f"<tr data-site='{html.escape(site or 'pooled')}'" + (" class='pooled'" if pooled else "") + ">" + name
            + "".join(_cell(rec.get(m), "recall@5") for m in ("local_only", "federated_dp", "adapted"))
            + _difference_cell(rec.get("adapted_minus_local_only"), "recall@5", rec.get("adapted_over_local_only"),
                               "recall@5")
            + "".join(_cell(r, "f1", cell_n) for r in g_rows)
            + _difference_cell(pair, "difference", pair, "ratio")
            + kept + "</tr>")
    head = ("<thead><tr><th rowspan='2'>Site</th><th colspan='4'>Recommender Recall@5 (the site's test points)</th>"
            "<th colspan='4'>Guidance F1 (scored test points)</th><th rowspan='2'>Kept on-site, and why</th></tr>"
            "<tr><th>local only</th><th>federated DP</th><th>adapted</th><th>adapted − local only</th>"
            "<th>initial (self+peer)</th><th>consortium policy</th><th>PMLM</th>"
            "<th>PMLM − initial</th></tr></thead>")
    notes = []
    if rbs is None:
        notes.append("Recommender columns are empty: per-site recommender figures need the trained reference models "
                     "(this run skipped them, <code>--no-trained-baselines</code>, or predates them).")
    if gbs is None:
        notes.append("Guidance is shown pooled only: this report has no per-site guidance figures.")
    return (f"<div class='scroll'><table class='sites'>{head}<tbody>{''.join(rows)}</tbody></table></div>"
            + "".join(f"<p class='note'>{n}</p>" for n in notes))


def recommender_detail(rbs: dict) -> str:
    """Every per-site recommender figure: Recall@5 and NDCG@5 of each model with intervals, and the ratio."""
    models = [m for m in ("local_only", "federated_dp", "adapted", "timing")
              if any(isinstance(r.get(m), dict) for r in [*(rbs.get("sites") or {}).values(), rbs.get("pooled") or {}])]
    head = ("<thead><tr><th rowspan='2'>Site</th>"
            + "".join(f"<th colspan='2'>{html.escape(RECOMMENDER_LABELS.get(m, m))}</th>" for m in models)
            + "<th colspan='2'>adapted / local only</th><th rowspan='2'>points / patients</th></tr><tr>"
            + "<th>Recall@5</th><th>NDCG@5</th>" * (len(models) + 1) + "</tr></thead>")
    body = []
    for site, r in [*(rbs.get("sites") or {}).items(), ("pooled", rbs.get("pooled") or {})]:
        first = next((r[m] for m in models if isinstance(r.get(m), dict)), {})
        ratio = r.get("adapted_over_local_only") or {}
        ratio_cells = "".join(
            f"<td class='num'><span class='v'>×{ratio[k]:.2f}</span><span class='ci'>{_iv(ratio.get(k + '_interval'))}"
            f"</span></td>" if _num_ok(ratio.get(k)) else "<td class='num'>–</td>" for k in ("recall@5", "ndcg@5"))
        body.append(f"<tr><td>{html.escape(site)}</td>"
                    + "".join(_cell(r.get(m), k) for m in models for k in ("recall@5", "ndcg@5"))
                    + ratio_cells + f"<td class='num'>{first.get('points', '–')} / {first.get('patients', '–')}</td></tr>")
    return f"<div class='scroll'><table>{head}<tbody>{''.join(body)}</tbody></table></div>"


def paired_table(paired: dict) -> str:
    """The pooled guidance comparisons: difference and ratio with paired intervals, and what they say."""
    rows = []
    for key, p in paired.items():
        if not isinstance(p, dict):
            continue
        css, words = verdict(p.get("difference"), p.get("difference_interval"), p.get("patients"))
        ratio = (f"×{p['ratio']:.2f}" + (f" ({p['ratio_interval'][0]:.2f}–{p['ratio_interval'][1]:.2f})"
                                         if _interval_ok(p.get("ratio_interval")) else "")
                 if _num_ok(p.get("ratio")) else "–")
        diff = (f"{_signed(p['difference'])} ({_iv(p.get('difference_interval'), signed=True) or 'no interval'})"
                if _num_ok(p.get("difference")) else "–")
        rows.append(f"<tr><td>{html.escape(PAIR_LABELS.get(key, key))}</td><td class='num'><span class='tag {css}'>"
                    f"{words}</span></td><td class='num'>{diff}</td><td class='num'>{ratio}</td>"
                    f"<td class='num'>{p.get('points', '–')}</td></tr>")
    if not rows:
        return ""
    return ("<table><thead><tr><th>Paired comparison (same points)</th><th>reads</th><th>F1 difference (95% CI)"
            "</th><th>ratio (95% CI)</th><th>points</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def guidance_table(g: dict, test_points, profile: str | None = None) -> tuple[str, str]:
    """The pooled ablation table and, where risk recall is undefined at every point, the note saying why."""
    has_risk = any(_num_ok(r.get("risk_recall")) for r in g.values() if isinstance(r, dict))
    head = ["precision", "recall", "F1", "F1 95% CI", "points"] + (["risk recall"] if has_risk else [])
    body = []
    for v, r in g.items():
        cells = [_fmt(r.get("precision")), _fmt(r.get("recall")), _fmt(r.get("f1")),
                 _iv(r.get("f1_interval")) or "–", str(r.get("points", test_points))]
        if has_risk:
            cells.append(_fmt(r.get("risk_recall")))
        body.append(f"<tr><td>{html.escape(VARIANT_LABELS.get(v, v))}</td>"
                    + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>")
    page = ("<table><thead><tr><th>prompt</th>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")
    note = "" if has_risk else (f"<p class='note'>{html.escape(risk_note_for(profile))} No risk targets among the scored points, so it is "
                                f"not shown.</p>")
    return page, note


def on_site_table(report: dict) -> str:
    on_site = report.get("on_site")
    if not isinstance(on_site, dict):
        return "<p class='note'>This report predates on-site adaptation and refinement (no <code>on_site</code>).</p>"
    policies, adaptations = on_site.get("prompt_policy") or {}, on_site.get("recommender") or {}
    rsites = (report.get("recommender_by_site") or {}).get("sites") or {}
    rows = []
    for site in _sites(report):
        r_what, r_why = _recommender_kept(adaptations.get(site), (rsites.get(site) or {}).get("adaptation"))
        d = policies.get(site) if isinstance(policies.get(site), dict) else {}
        p_what, _ = _policy_kept(policies.get(site), bool(policies))
        val = d.get("validation") if isinstance(d.get("validation"), dict) else {}
        f1s = " / ".join(f"{k} {v['f1']:.3f}" for k, v in val.items() if isinstance(v, dict) and _num_ok(v.get("f1")))
        rows.append(f"<tr><td>{html.escape(site)}</td><td style='text-align:left'><b>{html.escape(r_what)}</b><br>"
                    f"<span class='note'>{html.escape(r_why)}</span></td><td style='text-align:left'><b>"
                    f"{html.escape(p_what)}</b><br><span class='note'>{html.escape(str(d.get('reason', '')))}</span>"
                    f"</td><td class='num'>{html.escape(f1s) or '–'}</td>"
                    f"<td class='num'>{d.get('train_patients', '–')} / {d.get('val_points', '–')}</td>"
                    f"<td class='num'>{d.get('calls', '–')} / {d.get('llm_calls', '–')}</td>"
                    f"<td class='num'>{_fmt(d.get('seconds'), '.0f')}</td></tr>")
    return ("<div class='scroll'><table><thead><tr><th>Site</th><th>recommender kept</th><th>prompt policy kept</th>"
            "<th>validation F1</th><th>training patients / validation points</th><th>LLM requests / not cached</th>"
            "<th>seconds</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _stage(ex: dict) -> str:
    """Her stage at the example's point, from the example's own fields."""
    if ex.get("stage"):  # her stage, or the reading of a profile without stages (e.g. "age 62")
        return str(ex["stage"])
    if "gestational_week" not in ex or ("stage" in ex and ex["gestational_week"] is None):
        return ""  # (an older obgyn report.json has no "stage": its heading comes from the gestational week)
        return ""
    week = ex["gestational_week"]
    return f"gestational week {week:.0f}" if _num_ok(week) else "postpartum"


def _flag_count(v: dict) -> str:
    flagged = v.get("check")
    if not isinstance(flagged, list) or not flagged:
        return ""
    return f" — {len(flagged)} item{'s' if len(flagged) != 1 else ''} flagged"


def _points_of_patients(data: dict) -> str:
    """How many points the guidance rests on and of how many patients (an older report.json: one a patient)."""
    points, patients = data.get("test_points"), data.get("test_patients")
    if patients is None or patients == points:
        return "One point per test patient"
    return f"{points} points of {patients} test patients (up to several a patient, spread over the record)"


def _checked_items(v: dict) -> str:
    """What the answer check (client/assemble/check.py) found against her prompt, record and stage, as `pmlm advise`
    shows it; an older report.json without checks shows nothing here."""
    flagged = v.get("check")
    if not isinstance(flagged, list):
        return ""
    if not flagged:
        return "<p class='note'>Checked against the patient's prompt, record and stage: nothing flagged.</p>"
    def row(f: dict) -> str:
        item = html.escape(str(f.get("item", "")))
        reasons = html.escape("; ".join(map(str, f.get("reasons", []))))
        return f"<li>{f'<s>{item}</s>' if f.get('removed') else item} — {reasons}</li>"

    rows = "".join(row(f) for f in flagged if isinstance(f, dict))
    return (f"<p class='note'>Checked against the patient's prompt, record and stage ({len(flagged)} flagged):</p>"
            f"<ul>{rows}</ul>")


NOTICE = ("<p class='notice'><b>Decision support, not a diagnosis.</b> The answers below were written by {model}, a "
          "small language model, from prompts PMLM assembled; they are shown to measure the prompts and must be "
          "checked against the patient's record by a clinician.</p>")


SITE_NOTE = (
    "<p class='note'>Each figure is a mean over the site's test points with its 95% bootstrap interval over "
    "patients under it (all of a patient's points drawn together); n, the points and patients they are over, "
    "is under the site's name. "
    "<b>Recommender</b>: <b>local only</b> trained on the site's records alone (non-private), "
    "<b>federated DP</b> the consortium's model, <b>adapted</b> what the site uses: the consortium's model "
    "adapted on its own records (or kept, where its validation preferred it). <b>Guidance</b>: the initial "
    "self+peer prompt, the consortium's DP prompt policy, and <b>PMLM</b>, what the site uses: its "
    "site-refined policy where it kept one. Differences are paired (the same patients drawn for both): "
    "<b>gain</b> or <b>loss</b> only where the interval excludes 0, otherwise <b>no difference</b>, and "
    "<b>too few patients to tell</b> where fewer than 10 stand behind it (a bootstrap over so few gives too "
    "narrow an interval); the ratio is under it.</p>")


def site_section(report: dict) -> str:
    """The per-site table with the note that says how to read it, or why there is none."""
    if all(report.get(key) is None for key in ("recommender_by_site", "guidance_by_site", "on_site")):
        return site_table(report)
    return SITE_NOTE + site_table(report)


def render_html(report: dict) -> str:
    g, r, p = report.get("guidance") or {}, report.get("recommender") or {}, report["privacy"]
    d, rt = report["data"], report["runtime_s"]
    llm = report.get("llm") or {}
    model = html.escape(str(llm.get("model", "the LLM")))
    curve = [c for c in report.get("privacy_utility_curve") or [] if isinstance(c, dict)]
    curve_points = [(c.get("epsilon"), c.get("f1"), c.get("f1_interval")) for c in curve]
    curve_has_noise = any(_interval_ok(c.get("f1_interval")) for c in curve)
    guidance_rows, risk_note = guidance_table(g, d.get("test_points"), d.get("profile"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>PMLM report</title><style>{CSS}</style></head><body>",
             "<h1>PMLM — personalised guidance report</h1>",
             f"<p>{d['patients']} patients at {d['sites']} sites, {d['prediction_points']} prediction points; guidance "
             f"scored on {d['test_points']} held-out test points against what really happened next. LLM: "
             f"{model} ({llm.get('calls', '?')} calls, {llm.get('cached', '?')} from cache). "
             f"Run time {rt['total']:.0f} s (phase A {rt['phase_a']:.0f} s, B {rt['phase_b']:.0f} s, C {rt['phase_c']:.0f} s, "
             f"evaluation {rt['evaluation']:.0f} s).</p>",
             NOTICE.format(model=model),
             "<h2>Does each site gain? Per site and pooled</h2>",
             site_section(report),
             "<h2>Did personalisation help? Guidance ablation, pooled</h2>",
             "<p class='note'>Concepts the LLM's answer names (profile names and synonyms) against the patient's care "
             "events in the next horizon. <b>general</b>: no patient data; <b>self</b>/<b>peer</b>/<b>self+peer</b>: "
             "the initial personalised prompts; <b>consortium DP policy</b>: the prompt phase C's policy picks; "
             "<b>PMLM</b>: what each site uses (its site-refined policy where it kept one); <b>oracle</b>: the "
             f"patient's true next events listed (the model's ceiling). {_points_of_patients(d)}; the interval is a "
             "95% bootstrap over patients (all of a patient's points drawn together).</p>",
             guidance_rows, risk_note,
             paired_table(report.get("guidance_paired") or {}),
             hbar_chart([(VARIANT_LABELS.get(k, k), v.get("f1"), v.get("f1_interval")) for k, v in g.items()
                         if isinstance(v, dict)], "Guidance F1 by prompt (whiskers: 95% interval)", "F1", "prompt"),
             "<h2>Self-informed recommender</h2>",
             "<p class='note'>Test split of every site. federated_dp is the model the sites actually share; "
             "centralized and local_only are non-private references.</p>",
             table(r, ["recall@5", "ndcg@5", "auroc"]),
             hbar_chart([(k, v.get("recall@5"), None) for k, v in r.items() if isinstance(v, dict)],
                        "Recall@5, pooled", "Recall@5", "model", max_value=1.0)]
    rbs = report.get("recommender_by_site")
    if isinstance(rbs, dict):
        parts.append("<details><summary>Every recommender figure per site (Recall@5, NDCG@5, the timing floor, "
                     "adapted / local only)</summary>" + recommender_detail(rbs) + "</details>")
    parts += ["<h2>What each site kept on-site</h2>",
              "<p class='note'>Computed at the site from its own records after the federated run; never sent, no "
              "ledger entry.</p>",
              on_site_table(report),
              "<h2>Privacy</h2>",
              f"<p>Patient-level (ε, δ) per site at δ = {p['delta']:g}, composed over every release with the PLD "
              "accountant: the figure the budget is enforced on, and the one to read. The RDP figure is a second, "
              "looser bound on the same releases (it can exceed the budget without any overspending; it is not "
              "enforced). Every release is in the site's signed, hash-chained ledger "
              "(<code>pmlm audit verify</code>).</p>",
              table({s: {"ε (PLD, enforced)": v.get("epsilon"), "budget": v.get("budget"),
                         "RDP bound (looser, not enforced)": v.get("epsilon_rdp"), "releases": v.get("releases")}
                     for s, v in p["sites"].items()},
                    ["ε (PLD, enforced)", "budget", "RDP bound (looser, not enforced)", "releases"]),
              hbar_chart([(s, v.get("epsilon"), None) for s, v in p["sites"].items()], _budget_title(p["sites"]),
                         "ε (PLD)", "site", max_value=_budget(p["sites"])),
              "<h2>Privacy–utility</h2>",
              line_chart(curve_points, "Consortium DP policy's guidance F1 against ε per site",
                         "ε per site (patient-level, PLD)", "guidance F1"),
              "<p class='note'>Each point is a separate federated run at that budget, scored with the consortium's DP "
              "prompt policy (the sites' own refinement is the same at every ε and is left out). "
              + ("Error bars: the 95% bootstrap interval over the scored patients, the run-to-run noise of the "
                 "scoring set; where they overlap, the budgets do not differ measurably.</p>" if curve_has_noise else
                 "This report carries no interval for the curve's points (an older report.json), so its noise is not "
                 "shown.</p>"),
              "" if len(curve) > 1 else "<p class='note'>One ε in this run; <code>pmlm evaluate --curve 1,3,8</code> "
                                        "adds more points.</p>",
              "<h2>Example prompts and answers</h2>",
              NOTICE.format(model=model)]
    for i, ex in enumerate(report.get("examples", []), 1):
        stage = _stage(ex)
        parts.append(f"<h3>Test patient {i} (site {html.escape(ex['site'])}"
                     + (f", {html.escape(stage)}" if stage else "") + ")</h3><p>What really happened next: "
                     f"{html.escape(', '.join(ex['targets']))}</p>")
        for variant, v in ex["variants"].items():
            prompt = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in v["prompt"])
            parts.append(f"<details><summary><b>{html.escape(VARIANT_LABELS.get(variant, variant))}</b> — F1 "
                         f"{_fmt(v.get('f1'), '.2f')}{_flag_count(v)}</summary><pre>{html.escape(prompt)}</pre>"
                         f"<p>Answer:</p><pre>{html.escape(v['answer'])}</pre>{_checked_items(v)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    json_path = write_atomic(out / "report.json", json.dumps(report, indent=1, default=float))
    return json_path, write_atomic(out / "report.html", render_html(report))


if __name__ == "__main__":  # re-render a page from its report.json
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_suffix(".html")
    print(write_atomic(target, render_html(json.loads(source.read_text()))))
