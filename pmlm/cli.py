"""The `pmlm` command: one front door, sub-commands registered by name.

Each command group lives in its own module under ``pmlm.commands`` and exposes
``register(subparsers)``; groups are imported lazily so ``pmlm --help`` stays fast
and one broken optional dependency does not take the whole CLI down.

Every command takes ``--verbose`` and ``--log-file`` (before or after its name), and every flag's help
shows its default. Library warnings and framework logs stay off the console unless ``--verbose``
(pmlm/logs.py); a command with a work directory keeps them in its ``pmlm.log``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pmlm import __version__, logs
from pmlm.common.atomic import DurableWriteError

# command name -> module providing register(subparsers) and the handlers.
COMMAND_GROUPS = {
    "data": "pmlm.commands.data",
    "demo": "pmlm.commands.demo",
    "audit": "pmlm.commands.audit",
    "llm": "pmlm.commands.llm",
    "train": "pmlm.commands.train",
    "advise": "pmlm.commands.advise",
    "evaluate": "pmlm.commands.evaluate",
    "deploy": "pmlm.commands.deploy",
    "serve": "pmlm.commands.serve",
}


class CliError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


class _ShowsDefaults:
    """Appends "(default: ...)" to a flag's help unless the help already says what the default is; flags whose
    default is nothing (None, False, []) say in their help what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return help_text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help_text
        return help_text + " (default: %(default)s)"


class HelpFormatter(_ShowsDefaults, argparse.HelpFormatter):
    pass


class RawDescriptionHelpFormatter(_ShowsDefaults, argparse.RawDescriptionHelpFormatter):
    pass


def _add_logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    group = parser.add_argument_group("console and log options")
    # Below the top level the defaults are SUPPRESS, so `pmlm -v audit verify` is not reset by the sub-command.
    group.add_argument("-v", "--verbose", action="count", **({"default": 0} if top else {"default": argparse.SUPPRESS}),
                       help="also show library warnings and framework logs (Flower, absl, Opacus) on the console; "
                            "-vv adds DEBUG. Default: only PMLM's own output")
    group.add_argument("--log-file", type=Path, metavar="FILE", **({} if top else {"default": argparse.SUPPRESS}),
                       help="append every log record and warning here (default: the command's work directory's "
                            "pmlm.log where it has one, e.g. OUT/pmlm.log for demo; otherwise no log file)")


def subparsers_of(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command, parser) of every sub-command below `parser`, depth first; command as typed, e.g. "audit verify"."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield prefix + name, child
                yield from subparsers_of(child, prefix + name + " ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmlm", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pmlm {__version__}")
    _add_logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMAND_GROUPS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("pmlm.commands"):
                continue  # group not built yet
            raise
        module.register(sub)
    for _, child in subparsers_of(parser):
        raw = issubclass(child.formatter_class, argparse.RawDescriptionHelpFormatter)
        child.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
        if not any(isinstance(a, argparse._SubParsersAction) for a in child._actions):  # a command that runs
            _add_logging_options(child, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    logs.configure(args.verbose, args.log_file)
    try:
        return int(handler(args) or 0)
    except (CliError, DurableWriteError) as exc:  # DurableWriteError: e.g. a full disk; it names the file
        print(f"pmlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pmlm: interrupted", file=sys.stderr)
        return 130
    finally:
        logs.close_log_file()
