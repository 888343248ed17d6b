"""The site worker taking its SuperNode's tasks itself (client/task_taker.py).

The runtime API calls are Flower's own helpers; here they are replaced by recorders so each step's order and
content can be checked. The deploy rehearsal (test_deploy_local.py) runs the real thing against real SuperNodes.
"""

from __future__ import annotations

import io
import threading
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pmlm.client import task_taker
from pmlm.client.worker_link import SiteWorker
from test_site_worker import context, make_app, message

REPO = Path(__file__).resolve().parents[1]


def fab(clientapp: str | None) -> SimpleNamespace:
    clientapp_line = f'clientapp = "{clientapp}"\n' if clientapp else ""
    components = f'[tool.flwr.app]\npublisher = "p"\n[tool.flwr.app.components]\nserverapp = "s:app"\n{clientapp_line}'
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", f'[project]\nname = "x"\nversion = "1.0.0"\n{components}')
    return SimpleNamespace(content=buffer.getvalue(), hash_str=f"hash-of-{clientapp}")


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """The runtime-API steps of one task, recorded; `runtime.fab` is the FAB the task's run names."""
    steps: list = []
    state = SimpleNamespace(steps=steps, fab=fab(task_taker.PMLM_CLIENTAPP), message=message(), site=tmp_path)

    class Client:
        def close(self):
            steps.append(("close",))

    monkeypatch.setattr(task_taker.TaskTaker, "_client", lambda self, *interceptors: Client())
    monkeypatch.setattr(task_taker, "HeartbeatSender", lambda fn: SimpleNamespace(
        start=lambda: steps.append(("heartbeat on",)), stop=lambda: steps.append(("heartbeat off",))))
    monkeypatch.setattr(task_taker, "pull_task_input",
                        lambda client: (state.message, context(tmp_path), SimpleNamespace(), state.fab))
    monkeypatch.setattr(task_taker, "push_message", lambda client, reply, ctx: steps.append(("reply", reply, ctx)))
    monkeypatch.setattr(task_taker, "push_task_output",
                        lambda client, ctx, status, details: steps.append(("output", ctx, status, details)))
    return state


def test_pmlm_clientapp_is_the_one_the_app_bundle_names():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] == task_taker.PMLM_CLIENTAPP


def test_a_task_is_answered_by_the_worker_s_handlers_and_its_context_state_goes_back(runtime):
    calls: list = []
    worker = SiteWorker(runtime.site, make_app(calls), log=lambda text: None)
    task_taker.TaskTaker("127.0.0.1:1", worker.handle).run_task("token")
    names = [s[0] for s in runtime.steps]
    assert names == ["heartbeat on", "reply", "output", "heartbeat off", "close"]
    _, reply, ctx = runtime.steps[1]
    np.testing.assert_array_equal(reply.content.array_records["arrays"]["x"].numpy(), np.arange(4.0) * 2)
    assert reply.metadata.reply_to_message_id == "m1" and len(calls) == 1 and worker.answered == 1
    _, out_ctx, status, details = runtime.steps[2]
    assert out_ctx is ctx and int(out_ctx.state.config_records["seen"]["count"]) == 1  # the state the handler left
    assert status == task_taker.SubStatus.COMPLETED and details == ""


def test_a_handler_error_becomes_an_error_reply_and_a_failed_task(runtime):
    runtime.message = message(fail=True)
    worker = SiteWorker(runtime.site, make_app([]), log=lambda text: None)
    task_taker.TaskTaker("127.0.0.1:1", worker.handle).run_task("token")
    _, reply, _ = runtime.steps[1]
    assert reply.has_error() and "the handler refused" in reply.error.reason
    _, _, status, details = runtime.steps[2]
    assert status == task_taker.SubStatus.FAILED and "the handler refused" in details
    assert runtime.steps[-1] == ("close",)


@pytest.mark.parametrize("named", ["someone.else.app:app", None])
def test_code_the_coordinator_sends_is_never_run(runtime, named):
    """A run whose FAB names another ClientApp is refused: the site answers only with its installed PMLM app."""
    runtime.fab = fab(named)
    calls: list = []
    worker = SiteWorker(runtime.site, make_app(calls), log=lambda text: None)
    task_taker.TaskTaker("127.0.0.1:1", worker.handle).run_task("token")
    _, reply, _ = runtime.steps[1]
    assert reply.has_error() and "runs only its own installed app" in reply.error.reason
    assert calls == [] and worker.answered == 0


def test_a_task_for_another_site_is_refused(runtime, tmp_path):
    worker = SiteWorker(tmp_path / "another-site", make_app([]), log=lambda text: None)
    task_taker.TaskTaker("127.0.0.1:1", worker.handle).run_task("token")
    _, reply, _ = runtime.steps[1]
    assert reply.has_error() and "this worker answers for" in reply.error.reason


def test_the_taker_asks_until_stopped_and_survives_a_supernode_that_is_not_up(monkeypatch):
    answers = iter([ConnectionError("refused"), SimpleNamespace(HasField=lambda f: True, token="t1"),
                    SimpleNamespace(HasField=lambda f: False, token="")])
    taken, logged = [], []

    class Acquirer:
        def AcquireTask(self, request):
            assert list(request.supported_task_types) == [task_taker.TaskType.CLIENT_APP]
            nxt = next(answers, None)
            if nxt is None:
                taker.stop()
                return SimpleNamespace(HasField=lambda f: False, token="")
            if isinstance(nxt, Exception):
                raise nxt
            return nxt

        def close(self):
            pass

    taker = task_taker.TaskTaker("127.0.0.1:1", handle=None, log=logged.append)
    monkeypatch.setattr(taker, "_client", lambda *i: Acquirer())
    monkeypatch.setattr(taker, "run_task", taken.append)
    monkeypatch.setattr(task_taker, "LONGEST_WAIT_S", 0.01)
    thread = threading.Thread(target=taker.serve_forever)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and taken == ["t1"] and taker.taken == 1
    assert logged[0].startswith("cannot take tasks from the SuperNode yet") and "again" in logged[1]
