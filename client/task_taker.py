"""The site worker takes its SuperNode's ClientApp tasks itself, so no process is started per message.

Flower 1.42 (flwr/supernode, flwr/supercore/superexec): for every message the SuperNode creates a task; its
SuperExec polls the SuperNode's runtime API (AcquireTask) and starts `flwr-clientapp --token T` for each one, which
pulls the task's input (context, run, FAB, message), unpacks the FAB, imports its ClientApp, answers, then pushes the
reply and the context back. With ten sites on one machine, that process took 7-12 s per message before a line of
PMLM ran (measured 2026-12-07 with the site worker already answering: the process only forwarded the message).

Here the worker makes the same runtime-API calls in its own process, with Flower's own helpers for each step
(flwr/supernode/runtime/run_clientapp.py), and answers with the handlers it already has loaded
(worker_link.SiteWorker.handle: same app, mods, site policy, egress log and ledger). Flower's SuperExec still runs
beside it and takes a task only when the worker does not (gone, or slower to ask): that task's process then
forwards it to the worker over the socket, or answers by itself when no worker listens.

Only the PMLM app is run: the reply comes from the handlers installed at this site, never from code in the FAB
the coordinator sent. A task whose FAB names another ClientApp is refused with an error reply saying so.
"""

from __future__ import annotations

import threading
import time

from flwr.app import Error, Message
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

PMLM_CLIENTAPP = "pmlm.client.node_app:app"  # pyproject's [tool.flwr.app.components] clientapp
FIRST_WAIT_S = 0.05  # asking again soon after a task: a phase's messages follow each other closely
LONGEST_WAIT_S = 0.25  # an idle site asks four times a second (a local request to its own SuperNode)
# A task is there as soon as its message is, while the SuperNode may still be fetching the message's arrays from the
# SuperLink; Flower's puller then waits 1, 2, 4 s... between tries (its ClientApp process starts too slowly to
# notice). Here it tries again after 50 ms, at most 0.5 s apart.
PULL_FIRST_WAIT_S, PULL_LONGEST_WAIT_S = 0.05, 0.5


class ForeignApp(RuntimeError):
    """The task's FAB names a ClientApp other than PMLM's."""


def pull_task_input(client: RuntimeHttpClient):
    """The task's message, context, run and FAB, as flwr-clientapp pulls them (run_clientapp.pull_task_input),
    with the shorter waits for the message's arrays above."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode had no message for this task")
    tree, node = pulled.message_object_trees[0], Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_FIRST_WAIT_S, backoff_cap=PULL_LONGEST_WAIT_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # what Flower's ClientApp process sets too
    return message, context, run, fab


class TaskTaker:
    """Takes ClientApp tasks from the SuperNode's runtime API at `address` and answers each with `handle`
    (a function of message and context that returns the reply and updates the context's state in place)."""

    def __init__(self, address: str, handle, *, log=None):
        self.address = address
        self.handle = handle
        self.log = log or (lambda text: None)
        self.taken = 0
        self._stop = threading.Event()
        self._apps: dict[str, str] = {}  # FAB hash -> the ClientApp it names

    def _client(self, *interceptors) -> RuntimeHttpClient:
        # The runtime API listens on loopback without TLS unless the SuperNode was given runtime certificates,
        # which this kit does not do (deploy/scripts/start-supernode.sh).
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=list(interceptors),
                                                     retry_invoker=make_simple_http_retry_invoker())

    def serve_forever(self) -> None:
        acquirer = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        wait, failing = FIRST_WAIT_S, False
        try:
            while not self._stop.is_set():
                try:
                    took = self.take_one(acquirer)
                    if failing:
                        self.log("taking tasks from the SuperNode again")
                    failing = False
                except Exception as exc:  # not up yet, restarting, a refused call: say so once, ask again later
                    if not failing:
                        self.log(f"cannot take tasks from the SuperNode yet: {type(exc).__name__}: {exc}")
                    took, failing, wait = False, True, LONGEST_WAIT_S
                wait = FIRST_WAIT_S if took else min(wait * 2, LONGEST_WAIT_S)
                self._stop.wait(wait)
        finally:
            acquirer.close()

    def stop(self) -> None:
        self._stop.set()

    def take_one(self, acquirer: RuntimeHttpClient) -> bool:
        """Take one pending ClientApp task and answer it; False when there was none."""
        res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                      agentapp_fab_hashes=[]))
        if not (res.HasField("task") and res.token):
            return False
        self.run_task(res.token)
        self.taken += 1
        return True

    def run_task(self, token: str) -> None:
        """What `flwr-clientapp --token` does for one task, in this process: pull the input, answer, push the reply
        and the context (with its state) back, and the task's final status; a heartbeat runs meanwhile."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "the site worker could not answer the task"
        started = time.monotonic()
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.monotonic()
            self._check_app(fab)
            reply = self.handle(message, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # answered with an error reply, as Flower's own ClientApp process does
            details = f"{type(exc)}:<'{exc}'>"
            if not isinstance(exc, ForeignApp):
                self.log(f"a task failed: {type(exc).__name__}: {exc}")
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                answered = time.monotonic()
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
                if status == SubStatus.COMPLETED:
                    self.log(f"took the {message.metadata.message_type} task itself: its input came in "
                             f"{pulled - started:.1f} s, it was answered in {answered - pulled:.1f} s, its reply "
                             f"went in {time.monotonic() - answered:.1f} s")
            finally:
                heartbeat.stop()
                client.close()

    def _check_app(self, fab) -> None:
        if fab.hash_str not in self._apps:
            try:
                config = get_fab_config(fab.content)
            except ValueError as exc:  # Flower's own check of the bundle's pyproject (names a ClientApp, ...)
                config = {}
                self.log(f"the run's app bundle does not read as a Flower app: {exc}")
            app = config.get("tool", {}).get("flwr", {}).get("app", {})
            self._apps[fab.hash_str] = str(app.get("components", {}).get("clientapp", ""))
        named = self._apps[fab.hash_str]
        if named != PMLM_CLIENTAPP:
            self.log(f"a task for another app ({named or 'no ClientApp'}) was refused")
            raise ForeignApp(f"this PMLM site runs only its own installed app ({PMLM_CLIENTAPP}); the run's app "
                             f"names {named or 'no ClientApp'}")


def start_taking(address: str, handle, *, log=None) -> TaskTaker:
    """A TaskTaker asking in a background thread (a daemon: it ends with the worker)."""
    taker = TaskTaker(address, handle, log=log)
    threading.Thread(target=taker.serve_forever, name="task-taker", daemon=True).start()
    return taker
