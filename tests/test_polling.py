"""How soon a deployed round ends: the coordinator's reply polling (server/reply_polling.py) and the SuperNode's
shortened idle poll and waits (pmlm/deploy/supernode.py). The coordinator's sleeps are recorded, not slept."""

from __future__ import annotations

import time
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
from flwr.supernode import start_client_internal as supernode_loop

from pmlm.deploy import supernode
from pmlm.server import reply_polling


class SlowSites:
    """A grid whose site n answers on the `ready[n]`-th pull after the push (None: never)."""

    def __init__(self, ready: list[int | None]):
        self.ready, self.pulls, self.sent = ready, 0, {}

    def push_messages(self, messages):
        ids = []
        for n, message in enumerate(messages):
            self.sent[f"m{n}"] = (n, message)
            ids.append(f"m{n}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in sorted(message_ids):
            n, message = self.sent[mid]
            if self.ready[n] is not None and self.pulls >= self.ready[n]:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))  # a reply's id
        return out


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic and time.sleep of reply_polling on a clock that only moves when it sleeps."""
    state = {"now": 0.0, "sleeps": []}

    def sleep(seconds):
        state["sleeps"].append(round(seconds, 4))
        state["now"] += seconds

    monkeypatch.setattr(reply_polling.time, "monotonic", lambda: state["now"])
    monkeypatch.setattr(reply_polling.time, "sleep", sleep)
    return state


def outgoing(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(dst_node_id=100 + i) for i in range(n)]  # the fake grid only counts them


def test_replies_are_asked_for_soon_and_less_often_while_none_come(clock):
    grid = SlowSites([1, 7, 8])
    replies = reply_polling.send_and_receive(grid, outgoing(3))
    assert len(replies) == 3 and grid.pulls == 8
    # the first came at once; then 0.1 s doubling to the 1 s cap; after a reply, soon again
    assert clock["sleeps"] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1]
    assert max(clock["sleeps"]) <= reply_polling.LONGEST_WAIT_S < 3


def test_a_timeout_returns_the_replies_that_came_and_is_not_overslept(clock):
    grid = SlowSites([2, None])
    replies = reply_polling.send_and_receive(grid, outgoing(2), timeout=1.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock["now"] == pytest.approx(1.3)


def test_only_flower_s_deployed_grid_is_given_the_prompt_polling(tmp_path, monkeypatch):
    from flwr.clientapp import ClientApp
    from flwr.superlink.grid import InMemoryGrid, http_grid
    from flwr.superlink.grid.http_grid import HttpGrid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # put back after the test

    from pmlm.server.in_process import InProcessGrid

    deployed = HttpGrid.__new__(HttpGrid)  # no connection behind it: only send_and_receive is looked at
    assert reply_polling.poll_promptly(deployed) is deployed and type(deployed) is HttpGrid
    assert deployed.send_and_receive.__func__ is reply_polling.send_and_receive
    # the in-process grid answers at once with the replies there are; waiting for a dead site would hang the run
    in_process = InProcessGrid(ClientApp(), [], {})
    simulation = InMemoryGrid.__new__(InMemoryGrid)
    for grid in (in_process, simulation):
        assert reply_polling.poll_promptly(grid) is grid and "send_and_receive" not in vars(grid)


def test_the_coordinator_asks_again_soon_for_a_reply_s_arrays_still_being_uploaded(monkeypatch):
    """A reply listed before its SuperNode finished uploading its arrays: Flower's grid asks again after 1, 2, 4 s;
    the coordinator's after 50 ms, at most 0.5 s apart (server/reply_polling.py)."""
    from flwr.superlink.grid import http_grid
    from flwr.superlink.grid.http_grid import HttpGrid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # put back after the test
    reply_polling.poll_promptly(HttpGrid.__new__(HttpGrid))
    assert http_grid.pull_objects.keywords == {"initial_backoff": reply_polling.PULL_FIRST_WAIT_S,
                                               "backoff_cap": reply_polling.PULL_LONGEST_WAIT_S}
    assert reply_polling.shorten_array_waits() and not isinstance(http_grid.pull_objects.func, partial)  # once
    tried_at = tries_of(http_grid.pull_objects, unavailable=3)
    gaps = [b - a for a, b in zip(tried_at, tried_at[1:])]
    assert max(gaps) < 0.6 and gaps[0] < 0.3  # Flower's own: 0.8-1.2 s, then 1.6-2.4 s, 3.2-4.8 s


def tries_of(pull_objects, unavailable: int) -> list[float]:
    """When `pull_objects` asked for one array that was not uploaded for its first `unavailable` tries."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    tried_at = []

    def pull(object_id):
        tried_at.append(time.monotonic())
        if len(tried_at) <= unavailable:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull_objects(["a"], pull_object_fn=pull) == {"a": b"content"}
    return tried_at


def test_a_changed_grid_puller_is_left_alone(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    monkeypatch.setattr(reply_polling.inspect, "getsource", lambda obj: "def pull_messages(self): return everything()")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not reply_polling.shorten_array_waits()
    assert "keeping its own waits" in str(caught[0].message) and not isinstance(http_grid.pull_objects, partial)


def test_the_supernode_loop_naps_shorter(monkeypatch):
    monkeypatch.setattr(supernode_loop, "time", supernode_loop.time)  # put back after the test
    monkeypatch.setattr(supernode_loop, "pull_objects", supernode_loop.pull_objects)
    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    assert supernode.shorten_naps(0.25)
    supernode_loop.time.sleep(3)  # the idle nap
    supernode_loop.time.sleep(0.5)  # waiting for the ClientApp's reply
    assert slept == [0.25, supernode.REPLY_POLL_S]
    assert supernode_loop.time.monotonic is supernode.time.monotonic  # everything else is the time module's


def test_the_supernode_asks_again_soon_for_arrays_still_being_uploaded(monkeypatch):
    """An array the coordinator is still uploading: Flower's loop asks again after 1, 2, 4 s; now after 0.1 s."""
    monkeypatch.setattr(supernode_loop, "time", supernode_loop.time)
    monkeypatch.setattr(supernode_loop, "pull_objects", supernode_loop.pull_objects)
    assert supernode.shorten_naps(1.0)
    tried_at = tries_of(supernode_loop.pull_objects, unavailable=2)
    assert supernode_loop.pull_objects.keywords == {"initial_backoff": supernode.PULL_FIRST_WAIT_S,
                                                    "backoff_cap": supernode.PULL_LONGEST_WAIT_S}
    # Flower's own waits would be 0.8-1.2 s, then 1.6-2.4 s
    assert tried_at[1] - tried_at[0] < 0.6 and tried_at[2] - tried_at[1] < 0.8


def test_a_changed_supernode_loop_is_left_alone(monkeypatch):
    monkeypatch.setattr(supernode_loop, "time", supernode_loop.time)
    monkeypatch.setattr(supernode_loop, "pull_objects", supernode_loop.pull_objects)
    monkeypatch.setitem(supernode.EXPECTED, "start_client_internal", "time.sleep(7)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not supernode.shorten_naps(0.25)
    assert "keeping its own timing" in str(caught[0].message)
    assert supernode_loop.time is supernode.time and not hasattr(supernode_loop.pull_objects, "keywords")


@pytest.mark.parametrize("raw, ok", [("", 1.0), ("0.5", 0.5), ("3", 3.0), ("0.01", None), ("9", None),
                                     ("soon", None)])
def test_idle_poll_setting_is_checked(raw, ok):
    if ok is None:
        with pytest.raises(SystemExit, match=supernode.IDLE_POLL_ENV):
            supernode.idle_poll_s({supernode.IDLE_POLL_ENV: raw})
    else:
        assert supernode.idle_poll_s({supernode.IDLE_POLL_ENV: raw}) == ok
