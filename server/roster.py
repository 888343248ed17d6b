"""The sites still taking part in a run, the ones that dropped out (when and why), and a clear stop when too few are left.

A site that does not answer a message in time (killed, cut off, its node gone) or answers with an error is
dropped for the rest of the run: later rounds and phases ask only the others, so a run never waits on a dead
site and never mixes a late answer into a later round. Each round's aggregate is formed from the sites that
answered it: FedAvg averages their models; plain DP sums add their releases; SecAgg+ sums say which sites
their total covers. When fewer than `min_sites` remain the run stops with `TooFewSites`, which names every
dropped site with its phase, round and reason; it is never continued on a quietly smaller sum.

What a drop costs the site: a release is recorded in its ledger before the reply is sent, so a site that died
while computing has no entry for that round, and one that died after recording keeps an entry for a reply the
coordinator never used (over-counted, never under-counted). It is not asked again in this run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING
from typing import Iterable

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid


class TooFewSites(RuntimeError):
    pass


@dataclass
class SiteRoster:
    nodes: list[int]  # every site the run started with
    min_sites: int = 2
    names: dict[int, str] = field(default_factory=dict)  # node id -> site id, once a site has said it
    dropped: dict[int, dict] = field(default_factory=dict)  # node id -> {"phase", "round", "reason"}

    @property
    def active(self) -> list[int]:
        return [n for n in self.nodes if n not in self.dropped]

    def name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def drop(self, node: int, phase: str, round: int | None, reason: str) -> None:
        if node in self.dropped:
            return
        self.dropped[node] = {"phase": phase, "round": round, "reason": reason[:500]}
        log(WARNING, "[PMLM] site %s dropped out in %s%s: %s; %d of %d sites remain", self.name(node), phase,
            "" if round is None else f" round {round}", reason[:500], len(self.active), len(self.nodes))

    def settle(self, asked: Iterable[int], replies: Iterable[Message], phase: str,
               round: int | None = None) -> list[Message]:
        """The good replies among `replies`; every asked site that sent an error or nothing is dropped."""
        good, answered = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.drop(node, phase, round, f"error reply: {reply.error.reason}")
            elif node not in self.dropped:
                good.append(reply)
        for node in set(asked) - answered:
            self.drop(node, phase, round, "no reply within the timeout (site stopped or unreachable)")
        return good

    def require(self, phase: str, round: int | None = None) -> None:
        """Raise `TooFewSites` when fewer than `min_sites` sites are left."""
        if len(self.active) >= self.min_sites:
            return
        lost = "; ".join(f"{self.name(n)} ({d['phase']}" + ("" if d["round"] is None else f" round {d['round']}")
                         + f": {d['reason']})" for n, d in self.dropped.items())
        raise TooFewSites(f"{phase}" + ("" if round is None else f" round {round}") + f": {len(self.active)} of "
                          f"{len(self.nodes)} sites left, fewer than the {self.min_sites} the run needs; "
                          f"dropped: {lost}")

    def ask(self, grid: Grid, message_type: str, content: RecordDict, phase: str, round: int | None = None,
            timeout: float | None = None) -> list[Message]:
        """Send `content` to every site still in the run; the good replies, once enough sites gave one."""
        self.require(phase, round)
        asked = self.active
        replies = grid.send_and_receive([Message(content=content, dst_node_id=n, message_type=message_type)
                                         for n in asked], timeout=timeout)
        good = self.settle(asked, replies, phase, round)
        self.require(phase, round)
        return good

    def summary(self) -> dict:
        """For the coordinator's run summary: which sites took part to the end, which dropped out and why."""
        return {"sites": [self.name(n) for n in self.nodes], "completed": [self.name(n) for n in self.active],
                "dropped": {self.name(n): d for n, d in self.dropped.items()}, "min_sites": self.min_sites}
