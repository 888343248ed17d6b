"""The HTML report: self-contained (opens offline) and showing every table and plot the report JSON feeds."""

from __future__ import annotations

import re

from pmlm.reports.demo import render_html, write_report

VARIANTS = ("general", "summary_only", "self", "peer", "self_peer", "pmlm", "oracle")


def _report(curve: list[tuple[float, float]]) -> dict:
    return {
        "data": {"patients": 120, "sites": 2, "prediction_points": 900, "test_points": 12},
        "privacy": {"delta": 1e-5, "sites": {
            "hospital_a": {"epsilon": 2.91, "epsilon_rdp": 3.2, "budget": 3.0, "releases": 9},
            "hospital_b": {"epsilon": 1.47, "epsilon_rdp": 1.7, "budget": 3.0, "releases": 5}}},
        "recommender": {"federated_dp": {"recall@5": 0.83, "ndcg@5": 0.85, "auroc": 0.87},
                        "popularity": {"recall@5": 0.59, "ndcg@5": 0.63, "auroc": float("nan")}},
        "guidance": {v: {"precision": 0.1 * i, "recall": 0.05 * i, "f1": 0.07 * i, "risk_recall": float("nan")}
                     for i, v in enumerate(VARIANTS)},
        "llm": {"model": "smollm2", "calls": 90, "cached": 3},
        "runtime_s": {"total": 300.0, "phase_a": 30.0, "phase_b": 5.0, "phase_c": 120.0, "evaluation": 140.0},
        "privacy_utility_curve": [{"epsilon": e, "f1": f} for e, f in curve],
        "examples": [{"site": "hospital_a", "targets": ["prenatal visit", "<script>x</script>"],
                      "variants": {"pmlm": {"prompt": [{"role": "system", "content": "Ignore <b>this</b>"}],
                                            "answer": "Schedule a prenatal visit.", "f1": 0.5}}}],
    }


def test_report_is_self_contained_and_plots_every_curve_point(tmp_path):
    curve = [(3.0, 0.21), (1.0, 0.12), (8.0, 0.25)]
    json_path, html_path = write_report(_report(curve), tmp_path)
    page = html_path.read_text()
    assert json_path.exists()
    # Offline: no scripts, stylesheets, images or fonts fetched from anywhere.
    assert not re.search(r"<script|<link|<img|src=|@import|url\(", page)
    assert page.count("<svg") == 4  # guidance F1, Recall@5, epsilon per site, the privacy-utility curve
    chart = page[page.index("Privacy–utility"):]
    chart = chart[chart.index("<svg"):chart.index("</svg>")]
    assert chart.count("<circle") == 3
    # The points are drawn left to right in epsilon order, each labelled with its F1.
    xs = [float(x) for x in re.findall(r'<circle cx="([\d.]+)"', chart)]
    assert xs == sorted(xs)
    for _, f1 in curve:
        assert f"{f1:.3f}" in chart
    assert "adds more points" not in page  # the hint is only for a one-point curve
    # Record text is escaped, never markup.
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page and "Ignore <b>" not in page


def test_a_one_point_curve_says_how_to_get_more():
    page = render_html(_report([(3.0, 0.2)]))
    assert "adds more points" in page
