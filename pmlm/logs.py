"""Where log records and warnings go: the console carries PMLM's own output; library warnings and framework logs
(Flower, dp-accounting's absl, Opacus and torch `UserWarning`s, gRPC) go to the log file, and reach the console
only with `pmlm --verbose` (`-vv` adds DEBUG). The same whether or not stdout is a terminal.

`pmlm` sets this up once, in `pmlm.cli.main`. A command with a work directory names its log file with
`default_log_file` (`--log-file` wins); a command without one keeps no log unless `--log-file` is given.
Flower's logger has its own console handler and is reset when flwr is imported, so code that imports flwr calls
`tame_flower()` afterwards (the pipeline does; it is cheap and idempotent).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FILE_NAME = "pmlm.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and tools swap it), like logging's lastResort."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class ConsoleRule(logging.Filter):
    """Quiet (the default): PMLM's own warnings and anyone's errors. Verbose: everything at the handler's level."""

    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity:
            return True
        own = record.name == "pmlm" or record.name.startswith("pmlm.")
        return record.levelno >= (logging.WARNING if own else logging.ERROR)


class _State:
    verbosity = 0
    console: logging.Handler | None = None
    file: logging.FileHandler | None = None
    explicit_file = False


def _level(verbosity: int) -> int:
    return logging.DEBUG if verbosity > 1 else logging.INFO


def configure(verbosity: int = 0, log_file: Path | None = None) -> None:
    """Once per `pmlm` command (again replaces what the last call set up): the console rule, warnings captured
    into logging (logger "py.warnings"), and the log file if one is named."""
    root = logging.getLogger()
    close_log_file()
    if _State.console is not None:
        root.removeHandler(_State.console)
    _State.verbosity = verbosity
    console = _Stderr()
    console.setLevel(_level(verbosity) if verbosity else logging.WARNING)
    console.addFilter(ConsoleRule(verbosity))
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    root.addHandler(console)  # a root handler also keeps absl from calling logging.basicConfig() on first use
    _State.console = console
    root.setLevel(_level(verbosity))
    # Opacus/torch UserWarnings become records: log file, console only if verbose. Off then on: captureWarnings(True)
    # is a no-op once it has been called, even if someone (a warnings.catch_warnings block) has since put
    # warnings.showwarning back, and the warnings would then bypass logging.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    _State.explicit_file = log_file is not None
    if log_file is not None:
        _open_log_file(Path(log_file))
    if "flwr.supercore.logger" in sys.modules:
        tame_flower()


def default_log_file(path: Path) -> Path | None:
    """A command's own log file (e.g. OUT/pmlm.log), unless `--log-file` named one; returns the file in use."""
    if not _State.explicit_file:
        _open_log_file(Path(path))
    return Path(_State.file.baseFilename) if _State.file is not None else None


def log_file() -> Path | None:
    return Path(_State.file.baseFilename) if _State.file is not None else None


def _open_log_file(path: Path) -> None:
    close_log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        print(f"pmlm: warning: cannot write the log file {path}: {exc}", file=sys.stderr)
        return
    handler.setLevel(_level(_State.verbosity))
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    _State.file = handler
    if "flwr.supercore.logger" in sys.modules:
        tame_flower()


def close_log_file() -> None:
    handler, _State.file = _State.file, None
    if handler is None:
        return
    logging.getLogger().removeHandler(handler)
    if "flwr.supercore.logger" in sys.modules:
        logging.getLogger("flwr").removeHandler(handler)
    handler.close()


def tame_flower() -> None:
    """Flower's logger under the same rule; call it after importing flwr (its import sets the logger to DEBUG and
    gives it a console handler at INFO, so a run prints every message and SecAgg+ stage).

    The logger stays at INFO (DEBUG with -vv) so in-process listeners such as the pipeline's progress bars hear the
    round markers and the log file keeps them; its own console handler shows errors only unless verbose. It does
    not propagate (a library that calls logging.basicConfig would otherwise print every line), so the log file is
    attached to it directly."""
    from flwr.common import logger as flwr_logger

    flower = flwr_logger.FLOWER_LOGGER
    flower.setLevel(_level(_State.verbosity))
    flower.propagate = False
    flwr_logger.console_handler.setLevel(_level(_State.verbosity) if _State.verbosity else logging.ERROR)
    if _State.file is not None and _State.file not in flower.handlers:
        flower.addHandler(_State.file)
