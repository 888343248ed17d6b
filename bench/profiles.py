"""Both task profiles side by side: the same pipeline (`pmlm evaluate`) on each profile's consortium, one table.

    python bench/profiles.py [--obgyn data/sample] [--chronic data/chronic] [--out out/profiles]
                             [--max-test-points 40] [--chronic-points-per-patient 2] [--epsilon 3]
                             [--from-reports] [--json FILE] [-- EXTRA ...]

Each profile runs `pmlm evaluate --profile NAME --data DIR --out OUT/NAME` (phases A, B, C and the evaluation, the
full JSON contract), unless --from-reports reads the OUT/NAME/report.json an earlier run wrote. Arguments after
`--` go to every `pmlm evaluate` (e.g. `-- --no-trained-baselines --phase-c-rate 0.1`). A profile without a
consortium is shown as missing, with the command that makes one (`pmlm data generate --profile chronic`).
The chronic consortium has few test patients with many visits each, so its guidance is scored on up to
--chronic-points-per-patient points a patient (`pmlm evaluate --points-per-patient`); obgyn's on one a patient.

Rows: the data (patients, sites, prediction points, scored test points); the recommender's Recall@5 with its floors
(popularity, the timing floor on the profile's clock: gestational weeks for obgyn, 5-year age bands for chronic),
the peer profile, federated DP and the non-private references (centralized, local only) when they were trained;
guidance F1 per prompt variant with its 95% bootstrap interval over patients, and PMLM − general paired over the
same points; the ε each site spent (PLD, the largest over sites) at the run's δ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                   ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("obgyn", "chronic")
RECOMMENDER_ROWS = (("popularity", "popularity floor"), ("timing", "timing floor"), ("peer_profile", "peer profile"),
                    ("federated_dp", "federated DP"), ("centralized", "centralized (non-private)"),
                    ("local_only", "local only (non-private)"))
VARIANT_ROWS = (("general", "general"), ("summary_only", "summary only"), ("self", "self"), ("peer", "peer"),
                ("self_peer", "self+peer (initial)"), ("pmlm_consortium", "consortium DP policy"),
                ("pmlm", "PMLM (what the site uses)"), ("oracle", "oracle (ceiling)"))


def run_evaluate(profile: str, data: Path, out: Path, args, extra: list[str]) -> Path:
    per_patient = args.chronic_points_per_patient if profile == "chronic" else 1
    cmd = [sys.executable, "-m", "pmlm", "evaluate", "--profile", profile, "--data", str(data), "--out", str(out),
           "--epsilon", str(args.epsilon), "--max-test-points", str(args.max_test_points),
           "--points-per-patient", str(per_patient), *extra]
    print(f"[{profile}] {' '.join(cmd[1:])}", file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "report.json"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def _fmt(x, spec: str = ".3f") -> str:
    return format(x, spec) if _num(x) else "–"


def _with_interval(row: dict | None, key: str = "f1") -> str:
    if not isinstance(row, dict):
        return "–"
    iv = row.get(f"{key}_interval")
    lo, hi = (iv.get("low"), iv.get("high")) if isinstance(iv, dict) else (iv if isinstance(iv, (list, tuple))
                                                                           and len(iv) == 2 else (None, None))
    sign = "+" if key == "difference" else ""  # a difference shows its sign
    text = _fmt(row.get(key), f"{sign}.3f")
    return f"{text} [{_fmt(lo, f'{sign}.2f')}, {_fmt(hi, f'{sign}.2f')}]" if _num(lo) and _num(hi) else text


def rows_of(report: dict | None) -> dict[str, str]:
    """The table's cells for one profile's report (every cell '–' without one)."""
    report = report or {}
    data, rec, gui = report.get("data") or {}, report.get("recommender") or {}, report.get("guidance") or {}
    cells = {"patients / sites": f"{data.get('patients', '–')} / {data.get('sites', '–')}",
             "prediction points": str(data.get("prediction_points", "–")),
             "guidance test points / patients": f"{data.get('test_points', '–')} / {data.get('test_patients', '–')}"}
    for key, label in RECOMMENDER_ROWS:
        cells[f"Recall@5 {label}"] = _fmt((rec.get(key) or {}).get("recall@5"))
    for key, label in VARIANT_ROWS:
        cells[f"F1 {label}"] = _with_interval(gui.get(key))
    cells["F1 PMLM − general (paired)"] = _with_interval((report.get("guidance_paired") or {}).get("pmlm_vs_general"),
                                                         "difference")
    privacy = report.get("privacy") or {}
    spent = [s.get("epsilon") for s in (privacy.get("sites") or {}).values() if _num(s.get("epsilon"))]
    cells["ε spent (largest site, PLD)"] = (f"{max(spent):.2f} at δ={privacy.get('delta')}" if spent else "–")
    return cells


def table(reports: dict[str, dict | None]) -> str:
    columns = {name: rows_of(r) for name, r in reports.items()}
    labels = list(next(iter(columns.values())))
    width = max(len(label) for label in labels)
    lines = [f"{'':<{width}}  " + "  ".join(f"{name:>22}" for name in columns)]
    for label in labels:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{columns[name][label]:>22}" for name in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obgyn", type=Path, default=ROOT / "data" / "sample", help="obgyn consortium")
    parser.add_argument("--chronic", type=Path, default=ROOT / "data" / "chronic", help="chronic consortium")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "profiles", help="one report folder per profile")
    parser.add_argument("--max-test-points", type=int, default=40)
    parser.add_argument("--chronic-points-per-patient", type=int, default=2,
                        help="chronic guidance points scored per test patient (obgyn: 1)")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--from-reports", action="store_true", help="tabulate OUT/NAME/report.json, run nothing")
    parser.add_argument("--json", type=Path, help="also write the two reports' figures as JSON here")
    args = parser.parse_args(argv)
    reports: dict[str, dict | None] = {}
    for name in PROFILES:
        data, out = getattr(args, name), args.out / name
        path = out / "report.json"
        if not args.from_reports:
            if not data.exists():
                print(f"[{name}] no consortium at {data}: make one with `pmlm data generate --profile {name} "
                      f"--out {data}`", file=sys.stderr)
                reports[name] = None
                continue
            path = run_evaluate(name, data, out, args, extra)
        reports[name] = json.loads(path.read_text()) if path.exists() else None
        if reports[name] is None:
            print(f"[{name}] no report at {path}", file=sys.stderr)
    print(table(reports))
    if args.json:
        args.json.write_text(json.dumps({name: rows_of(r) for name, r in reports.items()}, indent=1,
                                        ensure_ascii=False) + "\n")
    return 0 if any(reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
