"""Flower's SuperNode, asking the SuperLink for work sooner than every three seconds.

    python -m pmlm.deploy.supernode [flower-supernode's own arguments]

Flower 1.42's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps a fixed 3 s whenever the SuperLink
has no message for it, and 0.5 s at a time while it waits for the ClientApp's reply. A message sent to an idle
node therefore waits up to 3 s before anyone looks at it, in every round and every SecAgg+ stage. This starts the
same SuperNode (same arguments, same process, same TLS and node authentication) with those naps shortened to
SUPERNODE_IDLE_POLL_S (default 1 s) and 0.1 s: an idle site then sends one small request a second. The
SuperLink keeps its state in SQLite; at 0.25 s, ten sites on one machine jammed it once ("database is locked").

The loop also fetches each message's arrays from the SuperLink right after the message, and an array the
coordinator is still uploading is asked for again after 1 s, then 2, 4, up to 10 s; here after 0.1 s, at most 1 s
apart. (With ten sites on one machine a site's input still took 0.8-3.2 s to arrive after this: most of that is
the SuperLink serving ten SuperNodes on two busy cores, not these waits; bench/README.md.)

The naps are Flower's literals, not settings, so the loop's `time` is swapped for one whose sleep maps them, and
its `pull_objects` for one with the shorter waits. That is done only when the loop's source still reads as
described; otherwise the SuperNode starts unchanged and says so (a later Flower may have its own setting).
SUPERNODE_IDLE_POLL_S=3 keeps Flower's own timing.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import warnings
from functools import partial

IDLE_POLL_ENV = "SUPERNODE_IDLE_POLL_S"
DEFAULT_IDLE_POLL_S = 1.0
FLOWER_IDLE_S = 3  # the loop's nap when the SuperLink has no message
REPLY_POLL_S = 0.1  # instead of its 0.5 s naps while a reply is being computed
PULL_FIRST_WAIT_S, PULL_LONGEST_WAIT_S = 0.1, 1.0  # between tries for an array not uploaded yet
EXPECTED = {"start_client_internal": "time.sleep(3)", "_push_messages": "time.sleep(0.5)",
            "_pull_and_store_message": "pull_objects("}


class ShorterNaps:
    """Stands in for the `time` module inside Flower's SuperNode loop: the same functions, shorter sleeps."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == FLOWER_IDLE_S else min(seconds, REPLY_POLL_S))

    def __getattr__(self, name):
        return getattr(time, name)


def idle_poll_s(environ=os.environ) -> float:
    raw = environ.get(IDLE_POLL_ENV, "").strip() or str(DEFAULT_IDLE_POLL_S)
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{IDLE_POLL_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0.05 <= value <= FLOWER_IDLE_S:
        raise SystemExit(f"{IDLE_POLL_ENV} must be between 0.05 and {FLOWER_IDLE_S} seconds, got {raw!r}")
    return value


def shorten_naps(idle_s: float) -> bool:
    """Shorten the SuperNode loop's naps; False (and a warning) when the loop is not the one this was written for."""
    from flwr.supernode import start_client_internal as loop

    missing = [name for name, call in EXPECTED.items()
               if call not in inspect.getsource(getattr(loop, name, lambda: None))]
    if missing:
        warnings.warn(f"Flower's SuperNode loop has changed ({', '.join(missing)} no longer as expected): "
                      f"keeping its own timing", stacklevel=2)
        return False
    loop.time = ShorterNaps(idle_s)
    loop.pull_objects = partial(loop.pull_objects, initial_backoff=PULL_FIRST_WAIT_S, backoff_cap=PULL_LONGEST_WAIT_S)
    return True


def main() -> None:
    idle_s = idle_poll_s()
    if idle_s < FLOWER_IDLE_S:
        shorten_naps(idle_s)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # its usage and log lines name the command an operator knows
    flower_supernode()


if __name__ == "__main__":
    main()
