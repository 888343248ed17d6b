"""The HTML reports: self-contained (open offline), every table and plot the JSON feeds, and their structure: the demo
page's per-site table (one row per site and the pool), every chart with tick labels on both axes, differences read
as gains only where their interval excludes 0, older report.json files still rendered; the audit page's full run
ids, unbroken δ, separated cap lines and a failed ledger shown in its summary. How to look at them in a real
browser: tests/README.md."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pmlm.cli import main
from pmlm.common.privacy import AccountantSettings, BudgetConfig, GaussianRelease, SiteLedger
from pmlm.reports.audit import budget_bars, line_chart as audit_line_chart
from pmlm.reports.demo import render_html, verdict, write_report
from pmlm.pipeline.site_recommenders import site_table

VARIANTS = ("general", "summary_only", "self", "peer", "self_peer", "pmlm_consortium", "pmlm", "oracle")
SITES = ("hospital_a", "hospital_b", "small_clinic_d")
NAN = float("nan")


def _guidance_row(f1: float, points: int, risk: float = NAN) -> dict:
    return {"precision": f1, "recall": f1, "f1": f1, "risk_recall": risk, "f1_interval": [f1 - 0.03, f1 + 0.04],
            "points": points}


def _pair(difference: float, interval: list[float], points: int) -> dict:
    return {"difference": difference, "difference_interval": interval, "ratio": 1.2, "ratio_interval": [0.9, 1.6],
            "points": points}


def _recommender_by_site() -> dict:
    """The pipeline's own table (pmlm/pipeline/site_recommenders.site_table) on made-up per-point scores: hospital_a's
    adapted model is no better than local_only, small_clinic_d's clearly is."""
    rng = np.random.default_rng(0)
    points, patients = {}, {}
    for site, n, gain in (("hospital_a", 60, 0.0), ("hospital_b", 45, 0.0), ("small_clinic_d", 36, 0.3)):
        base = rng.uniform(0.4, 0.9, n)
        scores = {"local_only": base, "federated_dp": base * 0.95, "adapted": np.clip(base + gain, 0, 1),
                  "timing": base}
        points[site] = {k: (v, v) for k, v in scores.items()}
        patients[site] = [f"{site}/p{i % (n // 3)}" for i in range(n)]
    adaptation = {"hospital_a": {"choice": "consortium", "blend": 0.0, "epochs": 0, "val_points": 40,
                                 "reason": "validation preferred the consortium model"},
                  "hospital_b": {"choice": "fine_tuned", "blend": 1.0, "epochs": 5, "val_points": 30, "reason": ""},
                  "small_clinic_d": {"choice": "blend", "blend": 0.5, "epochs": 3, "val_points": 12, "reason": ""}}
    return site_table(points, patients, adaptation, resamples=200)


def _report(curve: list[tuple[float, float]], per_site: bool = True) -> dict:
    report = {
        "data": {"patients": 120, "sites": 3, "prediction_points": 900, "test_points": 12},
        "privacy": {"delta": 1e-5, "sites": {
            site: {"epsilon": 2.91, "epsilon_rdp": 3.2, "budget": 3.0, "releases": 9} for site in SITES}},
        "recommender": {"federated_dp": {"recall@5": 0.83, "ndcg@5": 0.85, "auroc": 0.87},
                        "popularity": {"recall@5": 0.59, "ndcg@5": 0.63, "auroc": NAN}},
        "guidance": {v: _guidance_row(0.05 * i, 12) for i, v in enumerate(VARIANTS)},
        "llm": {"model": "smollm2", "calls": 90, "cached": 3},
        "runtime_s": {"total": 300.0, "phase_a": 30.0, "phase_b": 5.0, "phase_c": 120.0, "evaluation": 140.0},
        "privacy_utility_curve": [{"epsilon": e, "f1": f, "f1_interval": [f - 0.05, f + 0.05], "points": 12}
                                  for e, f in curve],
        "examples": [{"site": "hospital_a", "targets": ["prenatal visit", "<script>x</script>"],
                      "gestational_week": 10.0,
                      "variants": {"pmlm": {"prompt": [{"role": "system", "content": "Ignore <b>this</b>"}],
                                            "answer": "Schedule a prenatal visit.", "f1": 0.5}}},
                     {"site": "hospital_b", "targets": ["postnatal visit"], "gestational_week": None,
                      "variants": {}}],
    }
    if per_site:
        report["guidance_by_site"] = {site: {v: _guidance_row(0.05 * i, 4) for i, v in enumerate(VARIANTS)}
                                      for site in SITES}
        report["guidance_paired"] = {
            "pmlm_vs_self_peer": {**_pair(0.06, [0.02, 0.10], 12), "by_site": {
                "hospital_a": _pair(0.05, [-0.02, 0.12], 4),  # contains 0: no difference
                "hospital_b": _pair(0.08, [0.01, 0.15], 4),
                "small_clinic_d": _pair(-0.09, [-0.15, -0.02], 4)}},
            "pmlm_vs_general": _pair(0.3, [0.2, 0.4], 12)}
        report["recommender_by_site"] = _recommender_by_site()
        report["on_site"] = {
            "prompt_policy": {
                "hospital_a": {"policy": "site-refined", "reason": "validation F1 0.214 against 0.151",
                               "train_patients": 40, "val_points": 24, "calls": 148, "llm_calls": 97,
                               "validation": {"consortium": {"f1": 0.151}, "refined": {"f1": 0.214}}},
                "hospital_b": {"policy": "consortium", "reason": "the refined policy did not score higher"},
                "small_clinic_d": {"policy": "consortium", "reason": "too few points to refine on"}},
            "recommender": {"hospital_a": None, "hospital_b": None, "small_clinic_d": None}}
    return report


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def _tick_labels(svg: str, axis: str) -> list[str]:
    return [t.strip() for t in re.findall(rf'<text[^>]*class="tick {axis}\b[^"]*"[^>]*>([^<]*)</text>', svg)]


def assert_every_chart_has_ticks(page: str) -> None:
    charts = _svgs(page)
    assert charts
    for svg in charts:
        title = re.search(r'aria-label="([^"]*)"', svg).group(1)
        assert [t for t in _tick_labels(svg, "x") if t], f"no x tick labels: {title}"
        assert [t for t in _tick_labels(svg, "y") if t], f"no y tick labels: {title}"
        assert re.search(r'class="axis-label x"[^>]*>[^<]+<', svg), f"no x axis label: {title}"
        assert re.search(r'class="axis-label y"[^>]*>[^<]+<', svg), f"no y axis label: {title}"


def _site_rows(page: str) -> dict[str, str]:
    table = re.search(r"<table class='sites'>.*?</table>", page, flags=re.S)
    assert table, "no per-site table"
    return dict(re.findall(r"<tr data-site='([^']+)'[^>]*>(.*?)</tr>", table.group(0), flags=re.S))


def test_report_is_self_contained_and_plots_every_curve_point(tmp_path):
    curve = [(3.0, 0.21), (1.0, 0.12), (8.0, 0.25)]
    json_path, html_path = write_report(_report(curve), tmp_path)
    page = html_path.read_text()
    assert json_path.exists()
    # Offline: no scripts, stylesheets, images or fonts fetched from anywhere.
    assert not re.search(r"<script|<link|<img|src=|@import|url\(", page)
    assert len(_svgs(page)) == 4  # guidance F1, Recall@5, epsilon per site, the privacy-utility curve
    chart = page[page.index("Privacy–utility"):]
    chart = chart[chart.index("<svg"):chart.index("</svg>")]
    assert chart.count("<circle") == 3
    assert chart.count('class="interval"') == 3  # each point's run-to-run noise, its bootstrap interval
    # The points are drawn left to right in epsilon order, each labelled with its F1.
    xs = [float(x) for x in re.findall(r'<circle cx="([\d.]+)"', chart)]
    assert xs == sorted(xs)
    for _, f1 in curve:
        assert f"{f1:.3f}" in chart
    assert _tick_labels(chart, "x") == ["1", "3", "8"]
    assert "adds more points" not in page  # the hint is only for a one-point curve
    # Record text is escaped, never markup.
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page and "Ignore <b>" not in page


def test_a_one_point_curve_says_how_to_get_more():
    page = render_html(_report([(3.0, 0.2)]))
    assert "adds more points" in page


def test_the_per_site_table_has_a_row_per_site_and_the_pool_and_says_no_difference_where_it_is_none():
    page = render_html(_report([(3.0, 0.2)]))
    rows = _site_rows(page)
    assert list(rows) == [*SITES, "pooled"]
    # Recommender: hospital_a adapted no better than local_only; small_clinic_d's gain is clear.
    a, d = rows["hospital_a"], rows["small_clinic_d"]
    cells = lambda row: re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)  # noqa: E731
    assert "no difference" in cells(a)[4] and "gain" not in cells(a)[4]
    assert "gain" in cells(d)[4]
    # Guidance: PMLM − initial per site from guidance_paired's by_site: 0 inside, above, below the interval.
    assert "no difference" in cells(a)[8] and "gain" not in cells(a)[8]
    assert "gain" in cells(rows["hospital_b"])[8]
    assert "loss" in cells(d)[8]
    # Every figure with its interval; n (points, patients) under the site's name.
    assert re.search(r"\d\.\d{3}–\d\.\d{3}", cells(a)[1]) and "points" in cells(a)[0] and "patients" in cells(a)[0]
    # What each site kept, and why.
    assert "site-refined policy" in cells(a)[-1] and "validation F1 0.214" in cells(a)[-1]
    assert "blend, 50% fine-tuned" in cells(d)[-1] and "too few points to refine on" in cells(d)[-1]
    assert "of 3 sites" in cells(rows["pooled"])[-1]
    assert_every_chart_has_ticks(page)


def test_verdicts_need_the_interval_to_exclude_zero():
    assert verdict(0.05, [-0.01, 0.1])[1] == "no difference"
    assert verdict(0.05, [0.01, 0.1])[1] == "gain"
    assert verdict(-0.05, [-0.1, -0.01])[1] == "loss"
    assert verdict(NAN, [NAN, NAN])[1] == "not measured"
    assert verdict(0.05, None)[1] == verdict(0.05, [0.01])[1] == verdict("0.05", [0.01, 0.1])[1] == "not measured"


def test_a_difference_resting_on_fewer_than_ten_patients_reads_neither_way():
    """The demo scores about 5 test patients a site: a bootstrap over so few draws too narrow an interval."""
    assert verdict(0.26, [0.09, 0.42], patients=5) == ("none", "too few patients to tell")
    assert verdict(-0.2, [-0.4, -0.1], patients=9)[1] == "too few patients to tell"
    assert verdict(0.26, [0.09, 0.42], patients=10)[1] == "gain"
    report = _report([(3.0, 0.2)])
    report["guidance_paired"]["pmlm_vs_self_peer"]["by_site"]["hospital_b"]["patients"] = 5
    report["guidance_paired"]["pmlm_vs_self_peer"]["patients"] = 24
    page = render_html(report)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", _site_rows(page)["hospital_b"], flags=re.S)
    assert "too few patients to tell" in cells[8] and "gain" not in cells[8]
    table = page[page.index("Paired comparison"):]
    assert "gain" in table.split("</tr>")[1]  # the pooled pair, 24 patients, still reads as what it is


def test_older_reports_and_skipped_reference_models_still_render():
    old = _report([(3.0, 0.2)], per_site=False)
    for row in old["guidance"].values():  # a report.json from before the intervals
        del row["f1_interval"], row["points"]
    old["privacy_utility_curve"] = [{"epsilon": 3.0, "f1": 0.2}]
    page = render_html(old)
    assert "no per-site figures" in page
    assert "carries no interval" in page
    assert_every_chart_has_ticks(page)

    skipped = _report([(3.0, 0.2)])
    skipped["recommender_by_site"] = None
    skipped["on_site"]["prompt_policy"] = {}  # refinement not run
    page = render_html(skipped)
    rows = _site_rows(page)
    assert list(rows) == [*SITES, "pooled"]
    assert "need the trained reference models" in page and "on-site refinement was not run" in page


def test_risk_recall_says_why_it_is_missing_and_examples_carry_her_stage():
    page = render_html(_report([(3.0, 0.2)]))
    assert "No risk targets among the scored points" in page and "risk recall</th>" not in page
    assert "Test patient 1 (site hospital_a, gestational week 10)" in page
    assert "Test patient 2 (site hospital_b, postpartum)" in page
    assert "Decision support, not a diagnosis" in page and "smollm2" in page

    with_risk = _report([(3.0, 0.2)])
    with_risk["guidance"]["pmlm"]["risk_recall"] = 0.5
    page = render_html(with_risk)
    assert "risk recall</th>" in page and "No risk targets" not in page


# -- the privacy audit report -------------------------------------------------------------------------------------

def test_audit_charts_have_ticks_on_both_axes_and_equal_caps_do_not_hide_each_other():
    chart = audit_line_chart("per phase", [{"label": "phase_a", "colour": "#111", "points": [(1, 0.5), (2, 0.9)]}],
                             [("phase_a cap", 1.5, "#111"), ("phase_b cap", 1.68, "#222"), ("phase_c cap", 1.68, "#333")],
                             "release number")
    bars = budget_bars([("s · patient-in-site · total", 2.0, 3.0)], failed={"s · patient-in-site · total"})
    assert_every_chart_has_ticks(chart + bars)
    caps = re.findall(r'<line [^>]*class="cap" stroke="(#\d+)"[^>]*stroke-dashoffset="(-?\d+)"', chart)
    assert {c for c, _ in caps} == {"#111", "#222", "#333"}
    # B and C at the same height: interleaved dashes (different offsets) under one label naming both.
    assert len({o for c, o in caps if c in ("#222", "#333")}) == 2
    assert "phase_b and phase_c caps 1.68" in chart and "phase_a cap 1.5" in chart
    assert "FAILED" in bars


@pytest.fixture(scope="module")
def audit_page(tmp_path_factory):
    """Two sites' ledgers (phases B and C with equal caps), one of them edited after the fact."""
    root = tmp_path_factory.mktemp("audit")
    budget = BudgetConfig(3.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.25, "phase_c": 0.25})
    for site in ("hospital-a", "hospital-b"):
        ledger = SiteLedger(root / site, site, budget, settings=AccountantSettings(pld_value_discretization_interval=1e-2),
                            run_id="phase-a-77e8f99c0fed")
        for phase, round_ in (("phase_a", 0), ("phase_a", 1), ("phase_b", 0), ("phase_c", 0)):
            ledger.release(phase, GaussianRelease(6.0, 1.0), lambda: None, round=round_, population_size=300)
    path = root / "hospital-b" / "ledger" / "privacy_ledger.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"round":1', b'"round":2', 1))
    assert main(["audit", "report", str(root / "hospital-a"), str(root / "hospital-b"), "--out", str(root / "r")]) == 1
    return (root / "r" / "privacy_report.html").read_text()


def test_the_audit_report_shows_full_run_ids_unbroken_deltas_and_the_failure_in_its_summary(audit_page):
    page = audit_page
    assert not re.search(r"<script|<link|<img|src=|@import|url\(", page)
    assert_every_chart_has_ticks(page)
    releases = page[page.index("<h2>Every release</h2>"):]
    assert releases.count("phase-<wbr>a-<wbr>77e8f99c0fed") == 8  # the whole id, breakable only at its hyphens
    assert "phase-a-</td>" not in page
    assert re.findall(r"<td class='num nowrap'>1e-05</td>", releases)
    assert not re.search(r"<td class='num'>1e-05</td>", page)
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>What is guaranteed")]
    assert summary.count("<span class='ok'>verified</span>") == 1 and "FAILED" in summary
    assert "1 of 2 ledgers FAILED verification: hospital-b" in page
    assert "phase_b and phase_c caps" in page
    assert "<div class='scroll'>" in page  # wide tables scroll inside the page, never past it


def test_example_answers_show_what_the_answer_check_flagged():
    report = _report([(3.0, 0.2)])
    pmlm = report["examples"][0]["variants"]["pmlm"]
    pmlm["check"] = [{"item": "- Augmentation of labor", "removed": False,
                      "reasons": ["names Augmentation of labor, which cannot happen at this stage: she delivered"]},
                     {"item": "- <i>Sixth item</i>", "removed": True,
                      "reasons": ["beyond the 5 items the prompt allows: removed"]}]
    report["examples"][1]["variants"] = {"general": {"prompt": [], "answer": "- Rest", "f1": 0.0, "check": []}}
    page = render_html(report)
    assert "F1 0.50 — 2 items flagged" in page
    assert "<s>- &lt;i&gt;Sixth item&lt;/i&gt;</s> — beyond the 5 items" in page  # escaped, struck through
    assert "cannot happen at this stage: she delivered" in page
    assert "Checked against the patient's prompt, record and stage: nothing flagged." in page
    del pmlm["check"]  # a report.json written before the check: no claim either way
    examples = render_html(report).split("Example prompts and answers")[1]
    assert "items flagged" not in examples and examples.count("Checked against the patient's prompt") == 1
