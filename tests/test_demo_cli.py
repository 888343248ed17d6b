"""`pmlm demo` starts from fresh sites: a previous demo's work directory is set aside, never deleted."""

from pmlm.commands.demo import set_aside_previous


def test_a_previous_demo_is_renamed_not_reused(tmp_path):
    work = tmp_path / "work"
    assert set_aside_previous(work) is None  # nothing there yet
    work.mkdir()
    assert set_aside_previous(work) is None and work.is_dir()  # empty: used as it is
    (work / "sites").mkdir()
    (work / "sites" / "ledger.jsonl").write_text("spent\n")
    first = set_aside_previous(work)
    assert first is not None and not work.exists()
    assert (first / "sites" / "ledger.jsonl").read_text() == "spent\n"
    (work / "sites").mkdir(parents=True)
    (work / "sites" / "x").write_text("again")
    second = set_aside_previous(work)  # the same second: a distinct name, the first copy untouched
    assert second != first and (second / "sites" / "x").read_text() == "again" and first.exists()
