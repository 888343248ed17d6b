"""The whole pipeline on a directory of records: read the sites once, run the federated phases, evaluate.
What `pmlm demo` and `pmlm evaluate` run; the privacy-utility curve repeats the federated run at other budgets."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pmlm.client.adapt import read_adaptation
from pmlm.client.llm import LLMConfig
from pmlm.client.phase_a import keep_site_examples
from pmlm.client.phase_c import site_llm
from pmlm.client.refine import RefineConfig, refine_site_policy
from pmlm.client.sites import load_site
from pmlm.common.profiles import load_profile
from pmlm.pipeline.evaluation import evaluate_guidance, evaluate_recommenders, privacy_summary
from pmlm.pipeline.federation import prepare_sites, quiet_flower, run_federation
from pmlm.pipeline.options import PipelineOptions, site_llm_settings


def run_pipeline(opts: PipelineOptions, log=print) -> dict:
    started = time.perf_counter()
    opts.workdir = opts.workdir.resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    records = load_consortium(opts)
    log(f"[1/5] sites: {', '.join(records.sites)}")
    report = run_pipeline_core(opts, records, log)
    return _with_curve(report, opts, log, started, records)


@dataclass
class Consortium:
    """The sites' records as read once: examples per site and the timelines prompts are assembled from."""

    sites: dict[str, Path]
    site_examples: dict[str, list]
    timelines: dict[tuple[str, str], object]
    patients: int


def load_consortium(opts: PipelineOptions) -> Consortium:

    sites = prepare_sites(opts)
    profile = load_profile(opts.profile)
    site_examples, timelines, patients = {}, {}, 0
    for name, path in sites.items():
        data, kept = load_site(name, path, profile, keep_timelines=True, progress=opts.progress)
        site_examples[name] = data.examples
        keep_site_examples(path, profile, data.examples)  # the in-process sites' handlers read the same records
        patients += data.patients
        timelines.update({(name, t.patient_id): t for t in kept})
    return Consortium(sites, site_examples, timelines, patients)


def refine_on_site(opts: PipelineOptions, records: Consortium, site_dirs: dict, log) -> dict:
    """Each site's own step after the federated run: refine the consortium's prompt policy on its records through
    its own LLM and response cache, and keep the refined one only where its validation points prefer it."""
    out = {}
    config = RefineConfig(max_calls=opts.refine_calls)
    for i, (name, site_dir) in enumerate(site_dirs.items(), 1):
        if i == 1:
            log("[3/5] on-site: each site refines the consortium's prompt policy on its own records (nothing leaves)")
        log(f"      {name}: refining ({i}/{len(site_dirs)})")
        timelines = {pid: t for (site, pid), t in records.timelines.items() if site == name}
        result = refine_site_policy(site_dir, site_llm(site_llm_settings(opts, name), site_dir),
                                    examples=records.site_examples[name],
                                    timelines=timelines, config=config)
        log(f"        {result.policy}: {result.reason}")
        out[name] = {k: v for k, v in result.to_json().items() if k != "site_dir"}
    return out


def run_pipeline_core(opts: PipelineOptions, records: Consortium, log=print) -> dict:
    """One federated run on the records read once (the curve's runs reuse them) and its evaluation."""

    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
        os.environ.setdefault(key, value)
    quiet_flower()  # the progress lines and bars say what happens; the rest goes to the log file
    opts.workdir = opts.workdir.resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sites, site_examples, timelines = records.sites, records.site_examples, records.timelines
    log(f"[2/5] federated phases A (DP recommender), B (DP peer prototypes), C (RL prompt policy) through Flower"
        f" ({opts.engine})")
    timing = run_federation(opts, sites)
    site_dirs = {name: opts.workdir / "sites" / name for name in sites}
    log(f"      phase A {timing['phase_a']:.0f} s, phase B {timing['phase_b']:.0f} s, phase C {timing['phase_c']:.0f} s")
    refined = refine_on_site(opts, records, site_dirs, log) if opts.refine else {}
    log("[4/5] evaluating the recommender against its baselines")
    eval_started = time.perf_counter()
    recommender, recommender_by_site = evaluate_recommenders(site_examples, site_dirs, opts)
    log(f"[5/5] evaluating guidance on up to {opts.max_test_points} test points x {len(opts.variants)} prompts")
    # Each site's prompts go to its own LLM client and response cache, as they would at the site.
    llms = {name: site_llm(site_llm_settings(opts, name), d) for name, d in site_dirs.items()}
    guidance = evaluate_guidance(site_examples, site_dirs, timelines, opts, llms)
    config = LLMConfig.from_dict(opts.llm) if opts.llm else None
    usages = [llm.usage for llm in llms.values()]  # every call this process made through them: phase C too
    report = {
        "data": {"patients": records.patients, "sites": len(sites), "profile": opts.profile,
                 "prediction_points": sum(len(v) for v in site_examples.values()),
                 "test_points": guidance["points"], "test_patients": guidance["patients"]},
        "privacy": privacy_summary(site_dirs, opts),
        "recommender": recommender,
        "recommender_by_site": recommender_by_site,  # None without the trained reference models
        "guidance": guidance["table"],
        "guidance_by_site": guidance["by_site"],
        "guidance_paired": guidance["paired"],
        "on_site": {"prompt_policy": refined, "recommender": {s: read_adaptation(d) for s, d in site_dirs.items()}},
        "llm": {"model": (config.model if config and config.model else "smollm2 (embedded SmolLM2-135M-Instruct)"),
                "calls": sum(u.calls for u in usages), "cached": sum(u.cache_hits for u in usages),
                "empty": sum(u.empty_answers for u in usages)},
        "runtime_s": {"total": round(time.perf_counter() - started, 1), "phase_a": timing["phase_a"],
                      "phase_b": timing["phase_b"], "phase_c": timing["phase_c"],
                      "evaluation": round(time.perf_counter() - eval_started, 1)},
        "examples": guidance["examples"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items() if k != "llm"},
        "phases": timing["later"],
    }
    return report


def _with_curve(report: dict, opts: PipelineOptions, log, started: float, records: Consortium) -> dict:
    # The curve is about what the budget buys: the consortium's DP policy at each epsilon (the sites' own refinement
    # is the same at every epsilon and is left out of the extra runs).
    def curve_point(r: dict, epsilon: float) -> dict:  # with its bootstrap interval: the scoring set's noise
        row = r["guidance"].get("pmlm_consortium", {})
        return {"epsilon": epsilon, "f1": row.get("f1"), "f1_interval": row.get("f1_interval"),
                "points": row.get("points")}

    report["privacy_utility_curve"] = [curve_point(report, opts.epsilon)]
    for eps in opts.curve:
        if eps == opts.epsilon:
            continue
        log(f"[curve] epsilon {eps} per site: another federated run, the consortium policy's prompts only")
        extra = PipelineOptions(**{**opts.__dict__, "epsilon": eps, "workdir": opts.workdir / f"curve-eps-{eps:g}",
                                   "variants": ("pmlm_consortium",), "curve": (), "baselines_trained": False,
                                   "refine": False})
        sub = run_pipeline_core(extra, records, log)
        report["privacy_utility_curve"].append(curve_point(sub, eps))
    report["runtime_s"]["total"] = round(time.perf_counter() - started, 1)
    return report
