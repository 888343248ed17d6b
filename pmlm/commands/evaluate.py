"""`pmlm evaluate`: the whole pipeline and its evaluation on any directory of FHIR bundles (or event tables)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pmlm import logs
from pmlm.cli import CliError
from pmlm.common.atomic import write_atomic
from pmlm.common.metrics import paired_verdict
from pmlm.common.privacy.accountant import describe_spent


def add_pipeline_arguments(p) -> None:
    p.add_argument("--sites", type=int, default=3, help="sites to split into when DIR has no sub-directories")
    p.add_argument("--epsilon", type=float, default=3.0, help="patient-level epsilon per site, all phases together")
    p.add_argument("--max-test-points", type=int, default=40, metavar="N",
                   help="held-out prediction points the guidance is scored on (each costs LLM calls per prompt)")
    p.add_argument("--points-per-patient", type=int, default=1, metavar="K",
                   help="score up to K test points of each test patient, spread over her record (every patient's "
                        "first point comes before anyone's second; intervals resample patients), e.g. 3 for a "
                        "profile with few test patients but many visits each (chronic)")
    p.add_argument("--rounds", type=int, default=3, help="phase A federated rounds")
    p.add_argument("--phase-c-rounds", type=int, default=1, help="phase C (RL prompt policy) federated rounds")
    p.add_argument("--phase-c-rate", type=float, default=0.25,
                   help="each training patient's chance to take part in a phase C round (Poisson sampling; "
                        "2 LLM calls per patient taken; 0.25 is about 22 of a sample site's patients)")
    p.add_argument("--curve", default="", help="extra epsilons for the privacy-utility curve, e.g. 1,8")
    p.add_argument("--profile", default="obgyn", help="task profile (common/profiles/NAME.json)")
    p.add_argument("--llm-base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint instead of the embedded LLM (default: the embedded LLM)")
    p.add_argument("--llm-model", default=None, metavar="NAME",
                   help="model name at --llm-base-url (default: the endpoint's own)")
    p.add_argument("--no-trained-baselines", action="store_true",
                   help="skip the centralized and local-only reference models (faster)")
    p.add_argument("--refine-calls", type=int, default=150, metavar="N",
                   help="the most LLM requests each site's on-site refinement of the prompt policy may make")
    p.add_argument("--variants", default=None, metavar="LIST",
                   help="comma-separated prompts the guidance evaluation scores, each an LLM request per test point: "
                        "general, summary_only, self, peer, self_peer, pmlm_consortium, pmlm, oracle (default: all; "
                        "`pmlm demo`: general, self_peer, pmlm_consortium, pmlm, oracle)")
    p.add_argument("--no-refine", action="store_true",
                   help="skip the sites' on-site refinement: every site uses the consortium's prompt policy")
    p.add_argument("--receive-only", default=None, metavar="SITES",
                   help="comma-separated sites whose policy receives phase A's model without training it "
                        "(phase_a_train false; e.g. small clinics whose DP update is mostly noise) "
                        "(default: none; `pmlm demo` on the bundled sample: its two small clinics)")


def options_from(args, data: Path, workdir: Path):
    from pmlm.pipeline import PipelineOptions
    from pmlm.pipeline.options import GUIDANCE_VARIANTS

    if args.epsilon <= 0:
        raise CliError("--epsilon must be > 0")
    if args.points_per_patient < 1:
        raise CliError(f"--points-per-patient must be >= 1, got {args.points_per_patient}")
    if args.refine_calls < 0:
        raise CliError(f"--refine-calls must be >= 0, got {args.refine_calls}")
    if not 0 < args.phase_c_rate <= 1:
        raise CliError(f"--phase-c-rate must be in (0, 1], got {args.phase_c_rate}")
    try:
        curve = tuple(float(x) for x in args.curve.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--curve takes comma-separated numbers, got {args.curve!r}") from None
    llm = {k: v for k, v in (("base_url", args.llm_base_url), ("model", args.llm_model)) if v}
    receive_only = tuple(s.strip() for s in (args.receive_only or "").split(",") if s.strip())
    variants = GUIDANCE_VARIANTS if args.variants is None else \
        tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in GUIDANCE_VARIANTS]
    if unknown or not variants:
        raise CliError(f"--variants: {', '.join(unknown) or 'none given'}; choose from {', '.join(GUIDANCE_VARIANTS)}")
    return PipelineOptions(data=data, workdir=workdir, sites=args.sites, epsilon=args.epsilon,
                           max_test_points=args.max_test_points, points_per_patient=args.points_per_patient,
                           rounds=args.rounds,
                           phase_c_rounds=args.phase_c_rounds, phase_c_rate=args.phase_c_rate,
                           profile=args.profile, baselines_trained=not args.no_trained_baselines, llm=llm,
                           curve=curve, progress=sys.stderr.isatty(), refine=not args.no_refine,
                           refine_calls=args.refine_calls, receive_only=receive_only,
                           variants=tuple(v for v in GUIDANCE_VARIANTS if v in variants))


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="run phases A, B, C and the evaluation on a directory of records",
                       description="Runs phases A, B, C and the evaluation on DIR (as `pmlm demo` does on the "
                                   "bundled sample) and writes the report. Give --out DIR (report.json, report.html, "
                                   "pmlm.log and work/ inside it), or --workdir and --json-out.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="FHIR bundles or event tables: one sub-directory per site, or one directory split into "
                        "--sites sites")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="directory for report.json, report.html, pmlm.log and (without --workdir) work/")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="keeps every site's directory and the coordinator's (default: OUT/work)")
    p.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                   help="write the JSON report here (default: OUT/report.json)")
    p.add_argument("--html-out", type=Path, default=None, metavar="FILE",
                   help="write the HTML report here (default: OUT/report.html; none without --out)")
    add_pipeline_arguments(p)
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from pmlm.client.llm import LLMError
    from pmlm.pipeline import PipelineError, run_pipeline
    from pmlm.reports.demo import render_html

    logs.tame_flower()  # the pipeline imported flwr

    if not args.data.exists():
        raise CliError(f"no such data directory: {args.data}")
    workdir = args.workdir or (args.out / "work" if args.out else None)
    json_out = args.json_out or (args.out / "report.json" if args.out else None)
    html_out = args.html_out or (args.out / "report.html" if args.out else None)
    if workdir is None or json_out is None:
        raise CliError("say where the results go: --out DIR (or --workdir DIR and --json-out FILE)")
    log_path = logs.default_log_file((args.out or workdir) / logs.LOG_FILE_NAME)
    opts = options_from(args, args.data, workdir)
    try:
        report = run_pipeline(opts)
    except LLMError as exc:
        raise CliError(f"the LLM could not answer: {exc}") from None
    except PipelineError as exc:
        raise CliError(str(exc)) from None
    write_atomic(json_out, json.dumps(report, indent=1, default=float))
    if html_out:
        write_atomic(html_out, render_html(report))
    print(summary_lines(report))
    print(f"report: {json_out}" + (f" and {html_out}" if html_out else ""))
    if log_path is not None:
        print(f"log: {log_path}")
    return 0


def _interval(row: dict, key: str = "f1") -> str:
    low, high = row.get(f"{key}_interval") or (float("nan"), float("nan"))
    return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]"


def _paired(pair: dict) -> str:
    low, high = pair["difference_interval"]
    verdict = paired_verdict(pair["difference"], pair["difference_interval"], pair.get("patients"))
    return f"{pair['difference']:+.3f} [{low:+.3f}, {high:+.3f}] on {pair['points']} points: {verdict}"


def summary_lines(report: dict) -> str:
    """What `pmlm demo` and `pmlm evaluate` print: guidance and recommender figures with their 95% intervals (a
    difference whose interval holds 0 reads "no difference"), what each site kept on-site, and privacy spent."""
    lines = ["", "Guidance F1 (the LLM's answer against what really happened next; 95% interval over patients):"]
    for variant, m in report["guidance"].items():
        lines.append(f"  {variant:<16} {_interval(m)}  (n={m['points']})")
    for name, pair in report.get("guidance_paired", {}).items():
        lines.append(f"  {name.replace('_vs_', ' - '):<32} {_paired(pair)}")
    by_site = report.get("recommender_by_site")
    if by_site:
        lines.append("Recommender Recall@5 per site (local only / federated DP / adapted at the site):")
        for site, t in {**by_site["sites"], "pooled": by_site["pooled"]}.items():
            cells = " / ".join(_interval(t[m], "recall@5") for m in ("local_only", "federated_dp", "adapted"))
            lines.append(f"  {site:<16} {cells}  (n={t['adapted']['points']} points, {t['adapted']['patients']} "
                         "patients)")
    else:
        lines.append("Recommender Recall@5: " + ", ".join(f"{k} {v['recall@5']:.3f}"
                                                       for k, v in report["recommender"].items()))
    kept = report.get("on_site", {}).get("prompt_policy") or {}
    if kept:
        lines.append("Prompt policy each site uses:")
        lines += [f"  {site:<16} {r['policy']}: {r['reason']}" for site, r in kept.items()]
    lines.append(privacy_lines(report["privacy"]))
    return "\n".join(lines)


def privacy_lines(privacy: dict) -> str:
    """The enforced ε (PLD) against each site's budget; RDP only as the labelled looser bound beside it."""
    lines = [f"Privacy spent per site (patient level, δ={privacy['delta']:g}, all phases):"]
    for site, v in privacy["sites"].items():
        lines.append(f"  {site:<16} {describe_spent(v['epsilon'], v.get('budget'), v.get('epsilon_rdp'))}")
    return "\n".join(lines)
