"""Ask every site the same question and get every answer, or a clear failure naming what went wrong."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class SitesDidNotAnswer(RuntimeError):
    pass


def ask_every_site(grid: Grid, nodes: list[int], message_type: str, content: RecordDict) -> list[Message]:
    replies = list(grid.send_and_receive([Message(content=content, dst_node_id=n, message_type=message_type)
                                          for n in nodes]))
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(nodes):
        reasons = "; ".join(str(r.error.reason) for r in failed)[:500]
        raise SitesDidNotAnswer(f"{len(failed) or len(nodes) - len(replies)} of {len(nodes)} sites did not answer "
                                f"{message_type}: {reasons}")
    return replies
