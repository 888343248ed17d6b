"""What a resampled consortium says about itself (its PROVENANCE.md): that it is resampled, from what, how each
site's care was varied, and the command that makes it again byte for byte."""

from __future__ import annotations

from pathlib import Path

from pmlm.common.atomic import write_atomic

PROVENANCE_TITLE = "# RESAMPLED consortium for scale tests: not new patients"
NOTICE = ("RESAMPLED population for scale tests, not new patients: every patient is a whole timeline of the source "
          "cohort under a fresh id and shifted dates; quality figures on it are not results on real-looking data.")


def write_provenance(out: Path, result: dict, names: dict[str, str]) -> None:
    def listed(concepts) -> str:
        return "; ".join(f"{names.get(c, c)} (`{c}`)" for c in concepts) or "-"

    sites, settings, source = result["sites"], result["settings"], result["source"]
    lines = [
        PROVENANCE_TITLE,
        "",
        f"**{NOTICE}**",
        "",
        "Use it to measure cost (time, memory, bytes) as sites and patients grow. Do not report recommender or",
        "guidance quality on it as a result: the same source timelines recur at every site (and within one), so",
        "held-out patients are copies of training patients.",
        "",
        f"- Source: {f'`{source}`' if source else 'the bundled sample (data/sample)'}, "
        f"{result['source_patients']} patients"
        + (f" ({result['skipped_rows']} rows the reader would quarantine left out)" if result["skipped_rows"] else "")
        + ".",
        f"- {len(sites)} sites x {result['patients_per_site']} patients, each patient one source timeline drawn with "
        "replacement, whole: every row of hers, under a fresh random id.",
        f"- Dates: each patient's dates (birth included, so ages hold) move back by 1 to "
        f"{settings['max_shift_days']} days.",
        "- Care patterns, seeded per site: dropped visit types are never written; a thinned type's visit is kept "
        f"with probability {settings['thinned_keep']}; a favoured type's visit is followed by a repeat of it (its "
        f"observations, procedures, reports and note) {settings['repeat_after_days'][0]} to "
        f"{settings['repeat_after_days'][1]} days later; dropped procedure types are never written. A dropped visit "
        "keeps its conditions, medications and immunizations (what she has, not what the site does). The "
        f"{result['profile']} profile's prediction points and pregnancy events are never changed, so every site "
        "has examples.",
        "",
        "Made again, byte for byte, into OUT by:",
        "",
        "```",
        f"pmlm data synth-consortium --sites {len(sites)} --patients {result['patients_per_site']} "
        f"--seed {result['seed']} --profile {result['profile']}" + (f" --source {source}" if source else "")
        + " --out OUT",
        "```",
        "",
        "| site | patients | rows | bytes | dropped visits | thinned visits | favoured visits | dropped procedures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        p = s["pattern"]
        lines.append(f"| {s['site']} | {s['patients']} | {s['rows']} | {s['bytes']} | {listed(p.dropped_visits)} | "
                     f"{listed(p.thinned_visits)} | {listed(p.favoured_visits)} | {len(p.dropped_procedures)} types |")
    lines.append("")
    write_atomic(out / "PROVENANCE.md", "\n".join(lines))
