"""`pmlm data synth-consortium`: a resampled consortium for scale tests (client/synth_consortium.py). Its source
here is the sample's smallest clinic (30 women), so each run reads little and writes a few dozen patients."""

from __future__ import annotations

import csv
import gzip
import io
import random
from collections import Counter
from datetime import date, timedelta

import pytest

from pmlm.cli import main
from pmlm.client.sites import discover_sites, load_site
from pmlm.client.synth_consortium import (CarePattern, MAX_SHIFT_DAYS, read_source, render_patient,
                                          synthesize_consortium)
from pmlm.common.profiles import load_profile
from pmlm.common.schema import concept_id

from conftest import SAMPLE

SOURCE = SAMPLE / "small_clinic_d"
OBGYN = load_profile("obgyn")


def _make(out, sites=3, patients=8, seed=7, **kw):
    return synthesize_consortium(out, sites, patients, OBGYN, SOURCE, seed=seed, progress=False, **kw)


def _rows(table) -> list[list[str]]:
    with gzip.open(table, "rt", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:]


def _tables(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "consortium"
    return out, _make(out)


def test_same_seed_same_bytes_whatever_the_jobs_and_another_seed_differs(made, tmp_path):
    out, _ = made
    again = tmp_path / "again"
    _make(again, jobs=2)
    assert _tables(again) == _tables(out)
    other = tmp_path / "other"
    _make(other, seed=8)
    assert _tables(other)["site_001/events.csv.gz"] != _tables(out)["site_001/events.csv.gz"]


def test_ids_are_fresh_and_unique_across_sites_and_dates_move_back(made):
    out, _ = made
    source_rows = _rows_plain(SOURCE)
    source_ids = {r[0] for r in source_rows}
    source_births = {date.fromisoformat(r[1]) for r in source_rows if r[2] == "patient"}
    seen = []
    for site in sorted(out.glob("site_*")):
        patients = [r for r in _rows(site / "events.csv.gz") if r[2] == "patient"]
        assert len(patients) == 8
        seen += [r[0] for r in patients]
        for r in patients:  # her birth is a source birth moved back 1..MAX_SHIFT_DAYS days
            born = date.fromisoformat(r[1])
            assert any(timedelta(days=1) <= b - born <= timedelta(days=MAX_SHIFT_DAYS) for b in source_births)
    assert len(seen) == len(set(seen)) == 24
    assert not source_ids & set(seen)


def _rows_plain(folder) -> list[list[str]]:
    return [r for table in folder.glob("events.csv*") for r in _rows(table)]


def test_each_site_follows_its_care_pattern_and_sites_differ(made):
    out, result = made
    mixes = []
    for site in result["sites"]:
        rows = _rows(out / site["site"] / "events.csv.gz")
        visits = Counter(concept_id(r[3], r[4]) for r in rows if r[2] == "encounter")
        procedures = {concept_id(r[3], r[4]) for r in rows if r[2] == "procedure"}
        pattern = site["pattern"]
        assert pattern.dropped_visits and pattern.thinned_visits and pattern.favoured_visits
        assert not set(pattern.dropped_visits) & set(visits)
        assert not set(pattern.dropped_procedures) & procedures
        total = sum(visits.values())
        mixes.append({c: n / total for c, n in visits.items()})
    patterns = [s["pattern"] for s in result["sites"]]
    assert len({(p.dropped_visits, p.favoured_visits) for p in patterns}) == 3  # seeded per site: all differ
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # total variation distance between the sites' visit mixes
        distance = sum(abs(mixes[a].get(c, 0) - mixes[b].get(c, 0)) for c in {*mixes[a], *mixes[b]}) / 2
        assert distance > 0.05


def test_a_pattern_drops_thins_and_repeats_visits_and_keeps_what_she_has():
    source = read_source(SOURCE)
    patient = max(source.patients, key=lambda p: len(p.visits))
    kinds = Counter(v.encounter for v in patient.visits if v.encounter)
    common, second = (c for c, _ in kinds.most_common(2))

    def rendered(pattern):
        _, text, rows = render_patient(patient, pattern, random.Random(1))
        table = list(csv.reader(io.StringIO(text)))
        assert len(table) == rows
        return table

    def count(table, concept, kind="encounter"):
        return sum(1 for r in table if r[2] == kind and concept_id(r[3], r[4]) == concept)

    plain = rendered(CarePattern((), (), (), ()))
    assert count(plain, common) == kinds[common]
    changed = rendered(CarePattern((common,), (), (second,), ()))
    assert count(changed, common) == 0
    assert count(changed, second) == 2 * kinds[second]  # each favoured visit and its repeat
    for kind in ("condition", "medication", "immunization"):  # a dropped visit keeps what she has
        assert sum(r[2] == kind for r in changed) >= sum(r[2] == kind for r in plain)
    thinned = rendered(CarePattern((), (common,), (), ()))
    assert 0 < count(thinned, common) < kinds[common]


def test_every_site_loads_through_the_site_loader_and_has_examples(made):
    out, _ = made
    sites = discover_sites(out)
    assert sorted(sites) == ["site_001", "site_002", "site_003"]
    for name, path in sites.items():
        site, _ = load_site(name, path, OBGYN, progress=False)
        assert site.patients == 8 and not site.quarantined
        assert site.examples


def test_the_command_says_it_is_resampled_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["data", "synth-consortium", "--sites", "2", "--patients", "3", "--source", str(SOURCE), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "RESAMPLED" in captured.out and "not new patients" in captured.out
    assert (out / "PROVENANCE.md").read_text().startswith("# RESAMPLED consortium for scale tests")
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err and (out / "site_002").is_dir()
    assert main(argv[:-4] + ["--patients", "1", "--source", str(SOURCE), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.md", "site_001", "site_002"]
    assert len([r for r in _rows(out / "site_001" / "events.csv.gz") if r[2] == "patient"]) == 1

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["data", "synth-consortium", "--out", str(other), "--force", "--source", str(SOURCE)]) == 2
    assert "holds no earlier synth-consortium" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"

    for bad, message in [(["--sites", "0"], "at least 1"), (["--patients", "0"], "at least 1"),
                         (["--source", str(tmp_path / "nowhere")], "no such source"),
                         (["--jobs", "0"], "--jobs 0")]:
        args = ["data", "synth-consortium", "--out", str(tmp_path / "fresh"), "--source", str(SOURCE), *bad]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
