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


def test_the_demo_scores_its_headline_prompts_and_evaluate_every_prompt_unless_told(tmp_path):
    import pytest

    from pmlm.cli import CliError, build_parser
    from pmlm.commands.evaluate import options_from
    from pmlm.pipeline.options import GUIDANCE_VARIANTS

    parser = build_parser()
    demo = options_from(parser.parse_args(["demo"]), tmp_path, tmp_path / "work")
    assert demo.variants == ("general", "self_peer", "pmlm_consortium", "pmlm", "oracle")
    evaluate = options_from(parser.parse_args(["evaluate", "--data", str(tmp_path)]), tmp_path, tmp_path / "w")
    assert evaluate.variants == GUIDANCE_VARIANTS
    chosen = parser.parse_args(["evaluate", "--data", str(tmp_path), "--variants", "oracle, general"])
    assert options_from(chosen, tmp_path, tmp_path / "w").variants == ("general", "oracle")  # in the report's order
    for bad in ("general,gpt", " , "):
        with pytest.raises(CliError, match="--variants"):
            options_from(parser.parse_args(["evaluate", "--data", str(tmp_path), "--variants", bad]), tmp_path,
                         tmp_path / "w")
