"""The reproduction report: one self-contained HTML page (inline SVG, opens offline) and its JSON."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from pmlm.common.atomic import write_atomic

COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac"]


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.3f}"
    return html.escape(str(x))


def bar_chart(values: dict[str, float], title: str, width: int = 560, max_value: float | None = None) -> str:
    items = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not math.isnan(v)]
    if not items:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    top = max_value or max(v for _, v in items) or 1.0
    row, label_w = 26, 130
    h = row * len(items) + 30
    parts = [f'<svg width="{width}" height="{h}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (k, v) in enumerate(items):
        y = 24 + i * row
        w = max(1.0, (width - label_w - 60) * v / top)
        parts.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(k)}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16" fill="{COLORS[i % len(COLORS)]}"/>'
                     f'<text x="{label_w + w + 5:.1f}" y="{y + 15}" font-size="12">{v:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(points: list[tuple[float, float]], title: str, xlabel: str, ylabel: str, width: int = 560,
               height: int = 240) -> str:
    if not points:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y1 = max(max(ys), 1e-6) * 1.15
    left, bottom, top, right = 50, height - 35, 45, width - 20

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (right - left)

    def sy(y):
        return bottom - y / y1 * (bottom - top)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>',
             f'<text x="{(left + right) / 2}" y="{height - 5}" font-size="12" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="5" y="{top - 8}" font-size="12">{html.escape(ylabel)}</text>',
             f'<path d="{path}" fill="none" stroke="{COLORS[0]}" stroke-width="2"/>']
    for x, y in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{COLORS[0]}"/>'
                     f'<text x="{sx(x):.1f}" y="{sy(y) - 8:.1f}" font-size="11" text-anchor="middle">{y:.3f}</text>'
                     f'<text x="{sx(x):.1f}" y="{bottom + 14}" font-size="11" text-anchor="middle">{x:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def table(rows: dict[str, dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
    body = "".join("<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns)
                   + "</tr>" for name, r in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:8px;font-size:12px}.note{color:#555;font-size:13px}
details{margin:6px 0}"""


def _budget(sites: dict) -> float | None:
    budgets = {v.get("budget") for v in sites.values()}
    return budgets.pop() if len(budgets) == 1 and isinstance(next(iter(budgets)), (int, float)) else None


def _budget_title(sites: dict) -> str:
    budget = _budget(sites)
    return ("ε spent per site (PLD, enforced)" if budget is None
            else f"ε spent per site (PLD, enforced); a full bar is the budget, ε = {budget:g}")


def render_html(report: dict) -> str:
    g, r, p = report["guidance"], report["recommender"], report["privacy"]
    d, rt = report["data"], report["runtime_s"]
    curve = report.get("privacy_utility_curve") or []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>PMLM report</title><style>{CSS}</style></head><body>",
             "<h1>PMLM — personalised guidance report</h1>",
             f"<p>{d['patients']} patients at {d['sites']} sites, {d['prediction_points']} prediction points; guidance "
             f"scored on {d['test_points']} held-out test points against what really happened next. LLM: "
             f"{html.escape(report['llm']['model'])} ({report['llm']['calls']} calls, {report['llm']['cached']} from cache). "
             f"Run time {rt['total']:.0f} s (phase A {rt['phase_a']:.0f} s, B {rt['phase_b']:.0f} s, C {rt['phase_c']:.0f} s, "
             f"evaluation {rt['evaluation']:.0f} s).</p>",
             "<h2>Did personalisation help? Guidance ablation</h2>",
             "<p class='note'>Concepts the LLM's answer names (profile names and synonyms) against her care events in "
             "the next horizon. <b>general</b>: no patient data; <b>self</b>/<b>peer</b>/<b>self_peer</b>: the "
             "initial personalised prompts; <b>pmlm</b>: the RL-refined prompt; <b>oracle</b>: her true next events "
             "listed (the model's ceiling).</p>",
             table(g, ["precision", "recall", "f1", "risk_recall"]),
             bar_chart({k: v["f1"] for k, v in g.items()}, "Guidance F1 by prompt", max_value=None),
             "<h2>Self-informed recommender</h2>",
             "<p class='note'>Test split of every site. federated_dp is the model the sites actually share; "
             "centralized and local_only are non-private references.</p>",
             table(r, ["recall@5", "ndcg@5", "auroc"]),
             bar_chart({k: v["recall@5"] for k, v in r.items()}, "Recall@5"),
             "<h2>Privacy</h2>",
             f"<p>Patient-level (ε, δ) per site at δ = {p['delta']:g}, composed over every release with the PLD "
             "accountant: the figure the budget is enforced on, and the one to read. The RDP figure is a second, "
             "looser bound on the same releases (it can exceed the budget without any overspending; it is not "
             "enforced). Every release is in the site's signed, hash-chained ledger "
             "(<code>pmlm audit verify</code>).</p>",
             table({s: {"ε (PLD, enforced)": v["epsilon"], "budget": v["budget"],
                        "RDP bound (looser, not enforced)": v["epsilon_rdp"], "releases": v["releases"]}
                    for s, v in p["sites"].items()},
                   ["ε (PLD, enforced)", "budget", "RDP bound (looser, not enforced)", "releases"]),
             bar_chart({s: v["epsilon"] for s, v in p["sites"].items()}, _budget_title(p["sites"]),
                       max_value=_budget(p["sites"])),
             "<h2>Privacy–utility</h2>",
             line_chart([(c["epsilon"], c["f1"]) for c in curve], "PMLM guidance F1 against ε per site",
                        "ε per site", "F1"),
             "" if len(curve) > 1 else "<p class='note'>One ε in this run; <code>pmlm evaluate --curve 1,3,8</code> "
                                       "adds more points.</p>",
             "<h2>Example prompts and answers</h2>"]
    for i, ex in enumerate(report.get("examples", []), 1):
        parts.append(f"<h3>Test patient {i} (site {html.escape(ex['site'])})</h3><p>What really happened next: "
                     f"{html.escape(', '.join(ex['targets']))}</p>")
        for variant, v in ex["variants"].items():
            prompt = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in v["prompt"])
            parts.append(f"<details><summary><b>{html.escape(variant)}</b> — F1 {v['f1']:.2f}</summary>"
                         f"<pre>{html.escape(prompt)}</pre><p>Answer:</p><pre>{html.escape(v['answer'])}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    json_path = write_atomic(out / "report.json", json.dumps(report, indent=1, default=float))
    return json_path, write_atomic(out / "report.html", render_html(report))
