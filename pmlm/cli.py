"""The `pmlm` command: one front door, sub-commands registered by name.

Each command group lives in its own module under ``pmlm.commands`` and exposes
``register(subparsers)``; groups are imported lazily so ``pmlm --help`` stays fast
and one broken optional dependency does not take the whole CLI down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pmlm import __version__
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pmlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMAND_GROUPS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("pmlm.commands"):
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (CliError, DurableWriteError) as exc:  # DurableWriteError: e.g. a full disk; it names the file
        print(f"pmlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pmlm: interrupted", file=sys.stderr)
        return 130
