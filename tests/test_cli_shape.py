"""Every `pmlm` command has one shape: each flag says what it does and what it defaults to, --verbose and
--log-file work on every command, --out names a directory. Walks the real parser, so a new flag cannot regress."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pytest

from pmlm import logs
from pmlm.cli import HelpFormatter, build_parser, main, subparsers_of



def _arguments():
    for _, parser in subparsers_of(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                    action.help == argparse.SUPPRESS:
                continue
            yield parser, action, f"{parser.prog} {action.option_strings[-1] if action.option_strings else action.dest}"


def test_every_argument_has_help_and_every_default_is_shown():
    missing, hidden_default, seen = set(), set(), set()
    for parser, action, name in _arguments():
        seen.add(name)
        if not action.help:
            missing.add(name)
            continue
        shown = HelpFormatter(parser.prog)._get_help_string(action)
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "default" not in shown.lower():
            hidden_default.add(name)
    assert missing == set(), f"arguments without help: {sorted(missing)}"
    assert hidden_default == set(), f"defaults not shown: {sorted(hidden_default)}"
    assert len(seen) > 80  # the walk reached every command


def test_rendered_help_shows_defaults():
    parser = build_parser()
    commands = dict(subparsers_of(parser))
    demo_help = commands["demo"].format_help()
    assert "(default: out/demo)" in demo_help and "(default: 3.0)" in demo_help
    assert "--verbose" in commands["audit verify"].format_help()
    assert "--verbose" in parser.format_help()


@pytest.mark.parametrize("argv", [["-v", "audit", "verify", "L"], ["audit", "verify", "L", "--verbose"],
                                  ["--verbose", "audit", "verify", "L", "--log-file", "x.log"]])
def test_verbose_and_log_file_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose == 1 and args.ledgers == [Path("L")]
    assert args.log_file == (Path("x.log") if "--log-file" in argv else None)


def test_quiet_console_keeps_library_warnings_in_the_log_file(tmp_path, capsys):
    log_file = tmp_path / "pmlm.log"
    absl = logging.getLogger("absl")
    level = absl.level  # client/phase_a.py raises absl to ERROR on import (its log-file noise); reset for the test
    try:
        absl.setLevel(logging.NOTSET)
        logs.configure(0, log_file)
        logging.getLogger("absl").warning("_compute_log_a_frac failed to converge")
        logging.getLogger("pmlm.client.grpc_service").warning("own warning")
        with warnings.catch_warnings():  # pytest records warnings per test: configure again inside this block
            warnings.simplefilter("always")
            logs.configure(0, log_file)
            warnings.warn("Secure RNG turned off", UserWarning)
        err = capsys.readouterr().err
        assert "absl" not in err and "Secure RNG" not in err and "own warning" in err
        text = log_file.read_text()
        assert "absl" in text and "Secure RNG" in text and "own warning" in text
        logs.configure(1)
        logging.getLogger("absl").warning("shown when verbose")
        assert "shown when verbose" in capsys.readouterr().err
    finally:
        absl.setLevel(level)
        logs.configure(0)
        logs.close_log_file()


def test_flower_is_quiet_unless_verbose(capsys):
    from flwr.common import logger as flwr_logger

    try:
        logs.configure(0)
        logs.tame_flower()
        assert flwr_logger.console_handler.level == logging.ERROR
        assert flwr_logger.FLOWER_LOGGER.isEnabledFor(logging.INFO)  # in-process listeners still hear rounds
        logs.configure(1)
        assert flwr_logger.console_handler.level == logging.INFO
    finally:
        logs.configure(0)


def test_membership_out_is_a_directory_and_a_json_path_still_names_the_file(tmp_path):
    from pmlm.commands.audit import membership_out

    site = tmp_path / "site"
    assert membership_out(site, None) == site / "audit" / "membership.json"
    assert membership_out(site, tmp_path / "results") == tmp_path / "results" / "membership.json"
    assert membership_out(site, tmp_path / "mine.json") == tmp_path / "mine.json"


def test_llm_ask_out_is_kept_as_an_alias_of_answer_file():
    parser = build_parser()
    assert parser.parse_args(["llm", "ask", "Hi", "--out", "a.txt"]).answer_file == Path("a.txt")
    assert parser.parse_args(["llm", "ask", "Hi", "--answer-file", "a.txt"]).answer_file == Path("a.txt")


def test_evaluate_needs_somewhere_to_write(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    assert "--out DIR" in capsys.readouterr().err
