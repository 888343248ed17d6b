"""Issue #17: do the refined prompt policies that sites kept on validation score higher on their test patients?

A demo scores guidance on 24 test points in all (about 5 a site), too few to tell whether one site's refinement
helped. This bench takes every refined policy a site kept in the work directories of earlier `pmlm demo` runs
(DEMO_OUT/work and the work.previous-* the demo moves aside), and scores it against that run's consortium policy on
up to --points test points of the site (round-robin over its test patients) and again on the validation points it
was chosen on, with the site's LLM and response cache (answers asked before cost nothing). It prints, per kept
refinement and pooled, the paired difference with its 95% bootstrap interval over patients (a pooled patient's
points from every run resampled together, since runs share test patients), what a stricter keep rule
(--keep-level: the lower end of that paired validation interval above 0) would have kept and dropped, and how
well validation gains predict test gains.

With --form KEY=VALUE ... it asks instead whether one fixed change to the initial prompt (e.g. show_probs=True,
which seven of the nine kept refinements made) is better at every site of the latest run: the changed prompt
against the initial one on up to --points training points of each site (the data a prompt design may be chosen
on), then on up to --points test points.

With --screen FORM ... (each FORM one or more KEY=VALUE joined by commas) it screens several such changes at once:
each against the initial prompt on up to --points training points of every site, ranked by the pooled paired
difference, and only the --confirm best of them then on up to --points test points. Choosing among many forms on
training points favours the lucky ones (2026-12-08: a form scored +0.117 on training points and −0.067 on test),
so only the test figures of the confirmed few are results; the more forms screened, the fewer should be confirmed.

    python bench/refinements.py [--demo-out out/demo] [--points 40] [--keep-level 0.8] [--json-out FILE]
    python bench/refinements.py --form show_probs=True [--points 40]
    python bench/refinements.py --screen summary=False trajectory=False summary=False,order=peer_first \
        [--workdir out/demo/work] [--points 20] [--test-points 40] [--confirm 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def kept_refinements(demo_out: Path) -> list[Path]:
    """Site directories, in every stored run of the demo, that hold a refined policy the site kept."""
    from pmlm.common.site_layout import SITE_POLICY

    runs = sorted(demo_out.glob("work.previous-*")) + [demo_out / "work"]
    return [site for run in runs for site in sorted((run / "sites").glob("*")) if (site / SITE_POLICY).exists()]


def open_site(site_dir: Path):
    """(site config, profile, artifacts, prompt assembler, examples, timelines) of one site directory."""
    from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
    from pmlm.client.refine import site_records
    from pmlm.client.site_config import SiteConfig
    from pmlm.common.profiles import load_profile

    site = SiteConfig.load(site_dir)
    profile = load_profile(site.profile)
    artifacts = SiteArtifacts.load(site_dir, profile)
    return (site, profile, artifacts, PromptAssembler(artifacts), *site_records(site, profile))


def score_pair(site_dir: Path, pick, splits: dict) -> dict:
    """Two of the site's policies, `pick(site_dir, artifacts)` -> (new, base), scored on the same points of each
    split (name -> (split, points, seed)) with the site's LLM and cache: each split's paired interval of new − base,
    its per-point pairs and both means."""
    from pmlm.client.llm import open_llm, site_llm_config
    from pmlm.client.refine import RefineConfig, held_out_points, score_policies
    from pmlm.client.reward import matcher_for
    from pmlm.common.metrics import paired_interval

    site, profile, artifacts, assembler, examples, timelines = open_site(site_dir)
    new, base = pick(site_dir, artifacts)
    out = {"run": site_dir.parent.parent.name, "site": site_dir.name}
    with open_llm(site_llm_config(site_dir, site.llm)) as llm:
        before = llm.usage.calls
        for name, (split, points, seed) in splits.items():
            chosen = held_out_points(assembler, examples, points, seed, timelines, split=split)
            scores = score_policies({"new": new, "base": base}, chosen, llm, matcher_for(profile.name),
                                    RefineConfig().sampling(), set())
            pair = (scores["new"]["f1_by_point"], scores["base"]["f1_by_point"], [p.example.patient_id for p in chosen])
            out[name] = {**paired_interval(*pair), "per_point": list(zip(*pair)),
                         "new": scores["new"]["f1"], "base": scores["base"]["f1"]}
        out["llm_calls"] = llm.usage.calls - before
    return out


def kept_against_consortium(site_dir: Path, artifacts):
    from pmlm.client.assemble.assembler import read_policy
    from pmlm.common.site_layout import SITE_POLICY

    return read_policy(site_dir, SITE_POLICY)[0], artifacts.consortium_policy


class FixedPrompt:
    """A policy that picks the same prompt for every patient (the scoring code asks a policy for .best)."""

    def __init__(self, params):
        self.params = params

    def best(self, state):
        return self.params


def score_sites(sites: list[Path], pick, splits: dict) -> list[dict]:
    """score_pair at every site, with a line of figures for each as it finishes."""
    rows = []
    for i, site_dir in enumerate(sites, 1):
        row = score_pair(site_dir, pick, splits)
        rows.append(row)
        print(f"[{i}/{len(sites)}] {row['run']} {row['site']}: " + "; ".join(
            f"{name} {row[name]['new']:.3f} against {row[name]['base']:.3f}, {row[name]['difference']:+.3f} "
            f"[{row[name]['difference_interval'][0]:+.3f}, {row[name]['difference_interval'][1]:+.3f}] on "
            f"{row[name]['points']} points of {row[name]['patients']} patients" for name in splits)
              + f" ({row['llm_calls']} LLM requests)", flush=True)
    return rows


def parse_form(pairs: list[str]) -> dict:
    """KEY=VALUE pairs of PromptParams fields, each value read as the field's type."""
    from dataclasses import fields

    from pmlm.common.assemble.render import PromptParams

    types = {f.name: type(getattr(PromptParams(), f.name)) for f in fields(PromptParams)}
    change = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--form: {key!r} is not a prompt option; known: {', '.join(types)}")
        kind = types[key]
        try:
            change[key] = (raw.lower() in ("true", "1", "yes")) if kind is bool else kind(raw)
        except ValueError:
            raise SystemExit(f"--form: {key} takes a {kind.__name__}, got {raw!r}") from None
    return change


def pooled(rows: list[dict], split: str) -> dict:
    """The rows' points of one split together, a patient being a site's patient (runs share a site's patients)."""
    from pmlm.common.metrics import paired_interval

    points = [(r, c, f"{row['site']}/{p}") for row in rows for r, c, p in row[split]["per_point"]]
    return paired_interval(*zip(*points)) if points else {"points": 0}


def line(label: str, figures: dict) -> str:
    if not figures.get("points"):
        return f"  {label}: no points"
    low, high = figures["difference_interval"]
    rlow, rhigh = figures["ratio_interval"]
    return (f"  {label}: {figures['difference']:+.3f} [{low:+.3f}, {high:+.3f}], ratio {figures['ratio']:.2f}× "
            f"[{rlow:.2f}, {rhigh:.2f}] on {figures['points']} points of {figures['patients']} patients")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", type=Path, default=REPO / "out" / "demo")
    p.add_argument("--points", type=int, default=40, help="test points per kept refinement")
    p.add_argument("--keep-level", type=float, default=0.8, help="the stricter keep rule to compare")
    p.add_argument("--form", nargs="+", metavar="KEY=VALUE",
                   help="score this change to the initial prompt at the latest run's sites instead")
    p.add_argument("--screen", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="screen these changes to the initial prompt on training points, confirm the best on test")
    p.add_argument("--test-points", type=int, help="with --screen: test points a site (default: --points)")
    p.add_argument("--confirm", type=int, default=3, help="with --screen: how many of the best go on to test points")
    p.add_argument("--workdir", type=Path, help="with --form or --screen: the run whose sites to use "
                                                "(default: DEMO_OUT/work)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.form and args.screen:
        p.error("--form and --screen are two different questions: ask one")
    if args.screen:
        return screen_forms(args)
    if args.form:
        return compare_form(args)
    sites = kept_refinements(args.demo_out)
    if not sites:
        print(f"no kept refinement under {args.demo_out} (run `pmlm demo --out {args.demo_out}` first)")
        return 1
    from pmlm.client.refine import RefineConfig
    from pmlm.common.metrics import paired_interval

    config = RefineConfig()
    started = time.perf_counter()
    rows = score_sites(sites, kept_against_consortium, {"validation": ("val", config.val_points, config.seed),
                                                        "test": ("test", args.points, config.seed + 1)})
    for row in rows:
        row["strict_low"] = paired_interval(*zip(*row["validation"]["per_point"]),
                                            level=args.keep_level)["difference_interval"][0]
    strict = [r for r in rows if r["strict_low"] > 0]
    dropped = [r for r in rows if r["strict_low"] <= 0]
    summary = {"refinements": len(rows), "test": pooled(rows, "test"), "validation": pooled(rows, "validation"),
               "test_kept_by_strict_rule": pooled(strict, "test"),
               "test_dropped_by_strict_rule": pooled(dropped, "test")}
    gains = np.array([[r["validation"]["difference"], r["test"]["difference"]] for r in rows])
    summary["val_test_correlation"] = float(np.corrcoef(gains.T)[0, 1]) if len(rows) > 2 else float("nan")
    print(f"\n{len(rows)} kept refinements from {len({r['run'] for r in rows})} demo runs, refined − consortium "
          f"policy (95% paired bootstrap over patients), {time.perf_counter() - started:.0f} s:")
    print(line("test", summary["test"]))
    print(line("validation (what they were kept on)", summary["validation"]))
    print(line(f"test, the {len(strict)} a {args.keep_level:.0%} keep rule would also keep",
               summary["test_kept_by_strict_rule"]))
    print(line(f"test, the {len(dropped)} it would drop", summary["test_dropped_by_strict_rule"]))
    print(f"  correlation of validation and test gains over the refinements: {summary['val_test_correlation']:+.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


def run_sites(args) -> list[Path]:
    """The site directories of the run --form and --screen use."""
    work = args.workdir or args.demo_out / "work"
    sites = sorted(d for d in (work / "sites").glob("*") if d.is_dir())
    if not sites:
        print(f"no sites under {work} (run `pmlm demo --out {args.demo_out}` first)")
    return sites


def compare_form(args) -> int:
    change = parse_form(args.form)
    sites = run_sites(args)
    if not sites:
        return 1
    from dataclasses import replace

    from pmlm.common.assemble.render import INITIAL

    def changed_against_initial(site_dir, artifacts):
        return FixedPrompt(replace(INITIAL, **change)), FixedPrompt(INITIAL)

    started = time.perf_counter()
    rows = score_sites(sites, changed_against_initial, {"train": ("train", args.points, 7),
                                                        "test": ("test", args.points, 7)})
    summary = {"change": change, "train": pooled(rows, "train"), "test": pooled(rows, "test")}
    print(f"\nthe initial prompt with {change} against the initial prompt, pooled over {len(rows)} sites (95% paired "
          f"bootstrap over patients), {time.perf_counter() - started:.0f} s:")
    print(line("training points (where a design may be chosen)", summary["train"]))
    print(line("test points", summary["test"]))
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


def score_forms(sites: list[Path], changes: dict, split: str, points: int, seed: int = 7) -> dict:
    """Each named change to the initial prompt and the initial prompt itself on the same points of the split at
    every site (each site's records read once, its LLM and cache): name -> the pooled paired interval of changed −
    initial (a patient being a site's patient), with "by_site" (site -> difference)."""
    from dataclasses import replace

    from pmlm.client.llm import open_llm, site_llm_config
    from pmlm.client.refine import RefineConfig, held_out_points, score_policies
    from pmlm.client.reward import matcher_for
    from pmlm.common.assemble.render import INITIAL
    from pmlm.common.metrics import paired_interval

    policies = {"initial": FixedPrompt(INITIAL), **{name: FixedPrompt(replace(INITIAL, **change))
                                                    for name, change in changes.items()}}
    per_point = {name: [] for name in changes}  # (changed, initial, patient) per point
    by_site = {name: {} for name in changes}
    for site_dir in sites:
        site, profile, _, assembler, examples, timelines = open_site(site_dir)
        chosen = held_out_points(assembler, examples, points, seed, timelines, split=split)
        started = time.perf_counter()
        with open_llm(site_llm_config(site_dir, site.llm)) as llm:
            scores = score_policies(policies, chosen, llm, matcher_for(profile.name), RefineConfig().sampling(), set())
        base = scores["initial"]["f1_by_point"]
        for name in changes:
            per_point[name] += [(f, b, f"{site_dir.name}/{p.example.patient_id}")
                                for f, b, p in zip(scores[name]["f1_by_point"], base, chosen)]
            by_site[name][site_dir.name] = round(scores[name]["f1"] - scores["initial"]["f1"], 4)
        print(f"  {site_dir.name}: {len(chosen)} {split} points, {len(policies)} prompts "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {name: {**paired_interval(*zip(*rows)), "by_site": by_site[name]} if rows else {"points": 0}
            for name, rows in per_point.items()}


def screen_forms(args) -> int:
    sites = run_sites(args)
    if not sites:
        return 1
    changes = {form: parse_form(form.split(",")) for form in args.screen}
    started = time.perf_counter()
    print(f"screening {len(changes)} changes to the initial prompt on up to {args.points} training points of each of "
          f"{len(sites)} sites ...", flush=True)
    train = score_forms(sites, changes, "train", args.points)
    ranked = sorted(changes, key=lambda name: train[name].get("difference", float("-inf")), reverse=True)
    print("\ntraining points (where a form may be chosen), changed − initial, best first:")
    for name in ranked:
        print(line(name, train[name]))
    confirmed = ranked[:max(args.confirm, 0)]
    test = {}
    if confirmed:
        points = args.test_points or args.points
        print(f"\nthe best {len(confirmed)} on up to {points} test points of each site ...", flush=True)
        test = score_forms(sites, {name: changes[name] for name in confirmed}, "test", points)
        print(f"\ntest points (the result: {len(confirmed)} of {len(changes)} forms confirmed here), changed − initial:")
        for name in confirmed:
            print(line(name, test[name]) + "; by site " + ", ".join(f"{s} {d:+.3f}"
                                                                     for s, d in test[name]["by_site"].items()))
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"train": train, "test": test, "confirmed": confirmed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
