"""A Ray-free, in-process Flower Grid: the ServerApp's messages go straight to ClientApp calls.

Used by tests (fast, inspectable), `pmlm train --in-process` and bench/recsys.py. Each node
keeps its own Context (node config, state) across rounds like a SuperNode does, a ClientApp that
raises answers with an error reply like a SuperNode's does (the coordinator then drops that site),
and every reply a node sends is kept in `outbox` so tests can inspect exactly what left each site.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
log = logging.getLogger(__name__)


@dataclass
class InProcessGrid(Grid):
    client_app: ClientApp
    node_configs: list[dict]
    run_config: dict
    outbox: list[tuple[int, Message]] = field(default_factory=list)  # (node id, reply) in sending order

    def __post_init__(self):
        self.contexts = {
            1000 + i: Context(run_id=RUN_ID, node_id=1000 + i, node_config=dict(cfg), state=RecordDict(),
                              run_config=dict(self.run_config))
            for i, cfg in enumerate(self.node_configs)
        }
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    # -- Grid ------------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Each node with its site's name, as a SuperLink knows the name a node was registered under."""
        return [NodeInfo(node_id=n, name=str(c.node_config.get("site-id", ""))) for n, c in self.contexts.items()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            delivered = self._deliver(msg)
            reply = self.handle(msg.metadata.dst_node_id, delivered)
            if reply is not None:
                self.outbox.append((msg.metadata.dst_node_id, reply))
                self._replies[delivered.metadata.message_id] = reply
            ids.append(delivered.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- internals -------------------------------------------------------------------------
    def handle(self, node: int, delivered: Message) -> Message | None:
        """What the node sends back: the ClientApp's reply, or an error reply if it raised (None: no reply)."""
        try:
            return self.client_app(delivered, self.contexts[node])
        except Exception as exc:
            log.exception("node %s: the ClientApp raised on %s", node, delivered.metadata.message_type)
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                           reply_to=delivered)

    def _deliver(self, msg: Message) -> Message:
        """The message as a SuperNode would receive it: ids and routing filled in by the 'link'."""
        meta = msg.metadata
        delivered = Metadata(
            run_id=RUN_ID, message_id=f"m{next(self._ids)}", src_node_id=0, dst_node_id=meta.dst_node_id,
            reply_to_message_id="", group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
            message_type=meta.message_type,
        )
        return Message(content=msg.content, metadata=delivered)


def run_in_process(server_app: ServerApp, client_app: ClientApp, node_configs: list[dict],
                   run_config: dict) -> tuple[InProcessGrid, Context]:
    """Run `server_app` against one in-process node per entry of `node_configs`; returns (grid, server context)."""
    # Messages stamp themselves with the process's task identity, which a SuperLink/SuperExec would set.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = InProcessGrid(client_app, node_configs, run_config)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_app(grid, context)
    return grid, context
