"""The ClientApp Flower loads in each deployed message's own process (pyproject's `clientapp`).

Flower 1.42's SuperNode starts a fresh process for every message. When the site worker listens
(client/site_worker.py), this app only hands the message over and returns the reply, so the process imports
Flower and a socket, not the handlers' torch, Opacus, dp-accounting and SciPy. Without a worker (or in
simulation, where nodes name no site-dir) it answers with the handlers of client/client_app.py itself.
A site worker started with --runtime-api takes most tasks itself (client/task_taker.py), so deployed, this runs
only for a task Flower's own launcher took first.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pmlm.client import worker_link


class NodeApp(ClientApp):
    def __init__(self, answer_here: ClientApp | None = None):
        super().__init__()
        self._answer_here = answer_here  # None: client_app's handlers, imported only when needed

    def __call__(self, message: Message, context: Context) -> Message:
        site_dir = context.node_config.get("site-dir")
        if site_dir is not None and (conn := worker_link.connect(str(site_dir))) is not None:
            return worker_link.forward(conn, message, context)
        if self._answer_here is None:
            from pmlm.client.client_app import app as handlers
            self._answer_here = handlers
        return self._answer_here(message, context)


app = NodeApp()
