"""The site worker (client/worker_link.py): the ClientApp hands a deployed message to it and returns its reply.

A tiny ClientApp of the same class as the product's stands in for the handlers; the deploy rehearsal
(test_deploy_local.py) runs the real ones through a worker that start-supernode.sh starts.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict


from pmlm.client import worker_link
from flwr.clientapp import ClientApp

from pmlm.client.node_app import NodeApp


def make_app(calls: list) -> ClientApp:
    app = ClientApp()

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        calls.append(threading.get_ident())
        if msg.content.config_records["config"]["fail"]:
            raise ValueError("the handler refused")
        context.state["seen"] = ConfigRecord({"count": int(context.state.config_records.get(
            "seen", ConfigRecord({"count": 0}))["count"]) + 1})
        doubled = msg.content.array_records["arrays"]["x"].numpy() * 2
        return Message(RecordDict({"arrays": ArrayRecord({"x": Array(doubled)}),
                                   "config": ConfigRecord({"site": str(context.node_config.get("site-id"))})}),
                       reply_to=msg)

    return app


def message(fail: bool = False) -> Message:
    """A query as a SuperNode delivers it."""
    meta = Metadata(run_id=11, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type="query.echo")
    return Message(RecordDict({"arrays": ArrayRecord({"x": Array(np.arange(4.0))}),
                               "config": ConfigRecord({"fail": fail})}), metadata=meta)


def context(site_dir) -> Context:
    return Context(run_id=11, node_id=7, node_config={"site-id": "h1", "site-dir": str(site_dir)}, state=RecordDict(),
                   run_config={})


@pytest.fixture
def serving(tmp_path):
    """A worker for a deep site directory (longer than a Unix socket address may be), in a thread."""
    site_dir = tmp_path / ("d" * 60) / ("e" * 60) / "site"
    site_dir.mkdir(parents=True)
    calls: list = []
    app = NodeApp(answer_here=ClientApp())  # the node's side: finding no worker would fail (no handler here)
    new_runs: list = []
    worker = worker_link.SiteWorker(site_dir, make_app(calls), on_new_run=lambda: new_runs.append(1), log=lambda text: None)
    thread = threading.Thread(target=worker.listen().serve_forever, daemon=True)
    thread.start()
    yield app, worker, site_dir, calls
    assert not new_runs  # every message here is of run 11: the loaded sites were kept
    worker.stop()
    thread.join(10)


def test_a_message_is_answered_by_the_worker_and_its_context_state_comes_back(serving):
    app, worker, site_dir, calls = serving
    assert len(os.fsencode(worker_link.socket_path(site_dir))) > 108  # reached through the folder's descriptor
    ctx = context(site_dir)
    for expected_count in (1, 2):
        reply = app(message(), ctx)
        assert np.array_equal(reply.content.array_records["arrays"]["x"].numpy(), np.arange(4.0) * 2)
        assert reply.content.config_records["config"]["site"] == "h1"
        assert ctx.state.config_records["seen"]["count"] == expected_count  # the worker's state, copied back
    assert worker.answered == 2 and len(set(calls)) == 1 and calls[0] != threading.get_ident()


def test_a_new_run_makes_the_worker_drop_the_sites_loaded_for_the_last(tmp_path):
    new_runs: list = []
    worker = worker_link.SiteWorker(tmp_path, make_app([]), on_new_run=lambda: new_runs.append(1),
                                    log=lambda text: None)
    thread = threading.Thread(target=worker.listen().serve_forever, daemon=True)
    thread.start()
    try:
        ctx, node = context(tmp_path), NodeApp(answer_here=ClientApp())
        node(message(), ctx)
        node(message(), ctx)
        assert not new_runs
        ctx.run_id = 12
        node(message(), ctx)
        assert new_runs == [1] and worker.answered == 3
    finally:
        worker.stop()
        thread.join(10)


def test_a_handler_error_comes_back_as_an_error_and_the_worker_keeps_serving(serving):
    app, worker, site_dir, _ = serving
    with pytest.raises(RuntimeError, match="site worker: ValueError: the handler refused"):
        app(message(fail=True), context(site_dir))
    assert app(message(), context(site_dir)).content.config_records["config"]["site"] == "h1"
    assert worker.answered == 1


def test_malformed_requests_and_other_sites_are_refused_and_the_worker_keeps_serving(serving):
    app, worker, site_dir, calls = serving
    conn = worker_link.connect(site_dir)
    with conn:
        conn.sendall(worker_link._LEN.pack(5) + b"\xff\x00junk"[:5] + worker_link._LEN.pack(3) + b"abc")
        assert worker_link._recv(conn) == worker_link._ERROR
        assert b"malformed request" in worker_link._recv(conn)
    conn = worker_link.connect(site_dir)
    with conn:
        conn.sendall(worker_link._LEN.pack(2))  # cut short: the peer hangs up mid-frame
    elsewhere = context(site_dir.parent)
    elsewhere.node_config["site-dir"] = str(site_dir.parent)
    with pytest.raises(RuntimeError, match="this worker answers for"):
        worker_link.forward(worker_link.connect(site_dir), message(), elsewhere)
    assert app(message(), context(site_dir)).content.config_records["config"]["site"] == "h1"
    assert worker.answered == 1 and len(calls) == 1


def test_only_the_sites_user_can_reach_the_socket(serving):
    _, _, site_dir, _ = serving
    path = worker_link.socket_path(site_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_without_a_worker_or_with_a_stale_socket_the_app_answers_in_process(tmp_path):
    calls: list = []
    app = NodeApp(answer_here=make_app(calls))
    assert app(message(), context(tmp_path)).content.config_records["config"]["site"] == "h1"  # no socket at all
    path = worker_link.socket_path(tmp_path)
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a worker that died
    assert path.exists()
    assert app(message(), context(tmp_path)).content.config_records["config"]["site"] == "h1"
    assert calls == [threading.get_ident()] * 2
    simulation = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert app(message(), simulation).content.config_records["config"]["site"] == "None"


def test_a_worker_stops_when_its_parent_is_gone(tmp_path):
    worker = worker_link.SiteWorker(tmp_path, make_app([]), log=lambda text: None).listen()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (worker.serve_forever(parent_pid=os.getppid() + 1), done.set()),
                              daemon=True)
    thread.start()
    assert done.wait(10)
    assert not worker_link.socket_path(tmp_path).exists()  # it cleans up its socket


def test_a_policy_changed_between_messages_holds_for_the_next_one_in_a_long_lived_process(tmp_path, monkeypatch):
    """In a worker the run's loaded site outlives a message; a fresh process per message read the policy anew.
    An operator who lowers the budget mid-run must see it hold from the next message on, in every phase."""
    from types import SimpleNamespace

    from pmlm.client import client_app, phase_a, phase_b
    from pmlm.common.phase_a import PhaseAConfig

    class FakeSite:  # what site_for keeps per run: the policy it was built under
        def __init__(self, site_id, data_dir, site_dir, cfg, policy):
            self.site_id, self.site_dir, self.policy, self.examples, self.caps = site_id, site_dir, policy, [], {}

    monkeypatch.setattr(phase_a, "SitePhaseA", FakeSite)
    monkeypatch.setattr(phase_b, "SitePhaseB", lambda *a, budget, **k: SimpleNamespace(budget=budget))
    client_app.forget_runs()
    cfg = PhaseAConfig(run_name="run-1")
    node = {"site-id": "h1", "data-dir": str(tmp_path / "data"), "site-dir": str(tmp_path / "site")}
    plan = {"run_id": "run-1", "plan": "{}"}

    def at(epsilon: float):
        ctx = Context(run_id=1, node_id=7, node_config={**node, "policy-epsilon-total": epsilon}, state=RecordDict(),
                      run_config={})
        site = client_app.site_for(ctx, cfg)
        return site, client_app._phase_b_site(site, cfg, plan)

    first, b_first = at(3.0)
    same, b_same = at(3.0)
    assert same is first and b_same is b_first  # an unchanged policy keeps what was loaded
    lowered, b_lowered = at(1.0)
    assert lowered is not first and lowered.policy.epsilon_total == 1.0
    assert b_lowered is not b_first and b_lowered.budget.epsilon_total == 1.0
    client_app.forget_runs()


def test_the_worker_reads_the_records_ahead_once_and_a_message_waits_for_that_read(tmp_path, monkeypatch):
    """start-supernode.sh passes --data-dir: the worker reads the records while it waits for the first run, and a
    message that comes during the read uses it instead of reading the same records a second time."""
    from types import SimpleNamespace

    from pmlm.client import phase_a, site_worker
    from pmlm.common.phase_a import PhaseAConfig
    from pmlm.common.profiles import load_profile

    data = tmp_path / "records"
    data.mkdir()
    (data / "events.csv").write_text("patient_id,date,code\n")
    monkeypatch.setattr(phase_a, "_EXAMPLES", {})
    started, release, reads = threading.Event(), threading.Event(), []

    def slow_load(site_id, data_dir, profile, progress):
        reads.append(site_id)
        started.set()
        release.wait(10)
        return SimpleNamespace(examples=["e1", "e2"]), None

    monkeypatch.setattr(phase_a, "load_site", slow_load)
    said = []
    ahead = threading.Thread(target=site_worker.read_ahead, args=(data, "h1", said.append))
    ahead.start()
    assert started.wait(10)
    asked = []
    message_thread = threading.Thread(target=lambda: asked.append(
        phase_a.site_examples(data, "h1", load_profile(PhaseAConfig().profile))))
    message_thread.start()
    release.set()
    ahead.join(10)
    message_thread.join(10)
    assert reads == ["h1"] and asked == [["e1", "e2"]]
    assert said and said[0].startswith("read the records ahead of the first run: 2 examples")


def test_a_failed_read_ahead_is_said_and_left_to_the_first_message(tmp_path, monkeypatch):
    from pmlm.client import phase_a, site_worker

    monkeypatch.setattr(phase_a, "_EXAMPLES", {})
    said = []
    site_worker.read_ahead(tmp_path / "no-such-folder", "h1", said.append)
    assert len(said) == 1 and said[0].startswith("reading the records ahead failed")


def test_the_worker_trains_with_the_threads_it_is_given_and_refuses_none(tmp_path):
    import torch

    from pmlm.client import site_worker

    before, said = torch.get_num_threads(), []
    try:
        site_worker.train_with_threads(1, said.append)
        assert torch.get_num_threads() == 1 and said == ["training with 1 torch thread(s)"]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        site_worker.main(["--site-dir", str(tmp_path), "--threads", "0"])


def test_the_worker_warms_up_under_its_message_lock_and_keeps_and_writes_nothing(tmp_path, monkeypatch):
    """After reading ahead, one throwaway DP-SGD epoch on a few training patients, holding the lock messages are
    answered under (training seeds torch's generator); nothing is written, and a failure only costs the head start."""
    import random

    from pmlm.client import phase_a, site_worker, train
    from test_phase_a import _write_site

    data = tmp_path / "records" / "h1"
    _write_site(data, "h1", 14, random.Random(3))
    monkeypatch.setattr(phase_a, "_EXAMPLES", {})
    lock, said, trained = threading.Lock(), [], []
    real = train.train_local

    def spy(model, dataset, settings, *args, **kwargs):
        trained.append((lock.locked(), settings.noise_multiplier, len(dataset)))
        return real(model, dataset, settings, *args, **kwargs)

    monkeypatch.setattr(train, "train_local", spy)
    before = sorted(tmp_path.rglob("*"))
    site_worker.read_ahead(data, "h1", said.append, warm_under=lock)
    assert trained == [(True, 1.0, site_worker.WARM_UP_PATIENTS)] and not lock.locked()
    assert said[-1].startswith("warmed up for the first run") and sorted(tmp_path.rglob("*")) == before

    # With the site directory, the site's own policy caps are worked out too (and cached for the first message).
    from pmlm.client.site_policy import SitePolicy
    from pmlm.common.privacy import accountant

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.json").write_text('{"privacy": {"epsilon_total": 2.75}}')
    accountant._calibrated_gaussian.cache_clear()
    monkeypatch.setattr(phase_a, "_EXAMPLES", {})
    said.clear()
    site_worker.read_ahead(data, "h1", said.append, warm_under=lock, site_dir=site_dir)
    assert "the policy caps" in said[-1] and accountant._calibrated_gaussian.cache_info().misses > 0
    before_message = accountant._calibrated_gaussian.cache_info()
    SitePolicy.load(site_dir).run_caps(1.375, 0.0, 1e-5)  # a run asking for the policy's own share: no PLD built
    after_message = accountant._calibrated_gaussian.cache_info()
    assert after_message.misses == before_message.misses and after_message.hits > before_message.hits
    assert sorted(p for p in tmp_path.rglob("*") if site_dir not in (p, *p.parents)) == before  # nor writes there
    assert sorted(site_dir.iterdir()) == [site_dir / "site.json"]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(train, "train_local", broken)
    monkeypatch.setattr(phase_a, "_EXAMPLES", {})
    said.clear()
    site_worker.read_ahead(data, "h1", said.append, warm_under=lock)
    assert said[-1].startswith("warming up failed (RuntimeError: no kernels today)") and not lock.locked()
