"""Waiting for the sites' replies without Flower's fixed three-second naps.

Flower 1.42's deployed grid (flwr/superlink/grid/http_grid.py) asks the SuperLink for replies, and when some are
still missing sleeps 3 s before asking again, so every wave of messages (a phase-A round, each SecAgg+ stage) ends
up to 3 s after its last reply arrived. Here the coordinator asks again after 0.1 s, then backs off to 1 s while
nothing comes: a pull is one small request to the SuperLink. (Asking much more often, with every site also asking
four times a second, jammed the SuperLink's SQLite state once: ten pushes waited, one failed "database is locked".)
Only the grid's public push and pull calls are used, so messages, replies and timeouts mean what they meant.

A reply is listed as soon as its message is at the SuperLink, while its SuperNode may still be uploading its arrays;
the grid then asks for a missing array again after 1 s, 2 s, 4 s... (Flower's pull defaults). Here the grid's puller
asks again after 50 ms, at most 0.5 s apart, as the site worker's does (client/task_taker.py). With ten sites on two
cores a round still ended 1.4-2.4 s after its last site had answered: each request to the busy SuperLink took
0.1-1.2 s (measured 2026-12-07; bench/README.md).
"""

from __future__ import annotations

import inspect
import time
import warnings
from functools import partial
from types import MethodType
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_WAIT_S = 0.1
LONGEST_WAIT_S = 1.0
PULL_FIRST_WAIT_S, PULL_LONGEST_WAIT_S = 0.05, 0.5  # between asks for a reply's array still being uploaded


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
    """Push `messages`, then pull their replies until all have come or `timeout` seconds have passed (None: wait
    for all). Returns the replies that came, in the order they came."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_WAIT_S
    while waiting:
        came = list(grid.pull_messages(waiting))
        replies += came
        waiting -= {m.metadata.reply_to_message_id for m in came}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        # A reply seldom comes alone (the sites of one wave finish close together): ask again soon after one.
        wait = FIRST_WAIT_S if came else min(wait * 2, LONGEST_WAIT_S)
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
    return replies


def poll_promptly(grid: Grid) -> Grid:
    """The same grid; when it is Flower's deployed one, its send_and_receive (the call Flower's strategies, the
    roster and the secure sum make) waits as above. The grid's own class is kept: Flower checks it, and its other
    calls are unchanged. Other grids keep theirs: simulation's asks every 0.1 s already, and the in-process one
    returns at once with the replies there are (a site that died sends none)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if isinstance(grid, HttpGrid):
        grid.send_and_receive = MethodType(send_and_receive, grid)  # type: ignore[method-assign]
        shorten_array_waits()
    return grid


def shorten_array_waits() -> bool:
    """The deployed grid's puller, with the shorter waits above for arrays still being uploaded (this process only).
    False, with a warning, when Flower's grid no longer pulls arrays as described; then its own waits stay."""
    from flwr.superlink.grid import http_grid

    if isinstance(http_grid.pull_objects, partial):
        return True  # already done in this process
    if "pull_objects(" not in inspect.getsource(http_grid.HttpGrid.pull_messages):
        warnings.warn("Flower's deployed grid no longer pulls a reply's arrays as expected: keeping its own waits",
                      stacklevel=2)
        return False
    http_grid.pull_objects = partial(http_grid.pull_objects, initial_backoff=PULL_FIRST_WAIT_S,
                                     backoff_cap=PULL_LONGEST_WAIT_S)
    return True
