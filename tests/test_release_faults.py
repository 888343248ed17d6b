"""Faults as they really happen to the real releases (issue #22).

- Phase B's and phase C's own releases (the registered SecAgg+ tasks "phase_b_release" and "phase_c_round",
  through the real ClientApp) in a secure sum that halts because two of four sites die while computing their
  vectors. The coordinator retries with the two survivors: a smaller group than the one their kept releases
  were made for. By default a site refuses to re-send a kept release to a smaller group (the difference of the
  two totals would expose the others' vectors): the run stops, naming why, and nobody was charged twice. A site
  whose policy sets `smaller_group_retry` re-sends the same noisy vector: the retry's total is the sum of the
  kept releases, one ledger entry each.
- A site that hangs in phase A: the coordinator waits `round-timeout` seconds, not forever, drops it and goes
  on with the others. The grid here waits for a missing reply as a SuperLink's grid does, until the timeout the
  coordinator passed (the in-process grid answers at once for a dead site, which hides a missing timeout).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from pmlm.client import phase_c as phase_c_module
from pmlm.client.client_app import app as client_app
from pmlm.client.phase_b import PhaseBSite
from pmlm.common.phase_b import PhaseBConfig
from pmlm.client.phase_a import SitePhaseA
from pmlm.common.phase_a import PhaseAConfig, new_model
from pmlm.client.phase_c import SitePhaseC
from pmlm.common.phase_c import PhaseCConfig
from pmlm.client.site_policy import SitePolicy
from pmlm.client.train import model_state
from pmlm.common.privacy import SiteLedger
from pmlm.common.privacy.kept import kept_path
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.profiles import load_profile
from pmlm.server import phase_b as server_phase_b
from pmlm.server import phase_c as server_phase_c
from pmlm.server.in_process import RUN_ID, InProcessGrid
from pmlm.server.phase_b import run_phase_b
from pmlm.server.phase_c import run_phase_c
from pmlm.server.roster import SiteRoster, TooFewSites

from test_noise_mechanism import ListingLLM, write_records

logging.getLogger("absl").setLevel(logging.ERROR)
SITES = ("hospital_a", "hospital_b", "hospital_c", "hospital_d")
VICTIMS = ("hospital_c", "hospital_d")
RUN = "faults-run"
CFG = PhaseAConfig(dim=16, max_history=16, points_per_patient=4, rounds=1, local_epochs=1, run_name=RUN)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on two shared cores: more threads only slow them down
    yield
    torch.set_num_threads(threads)


class SiteKilled(BaseException):
    """The site's process is gone (a BaseException, so no handler turns it into an error reply)."""


ARMED = {"now": False}


@dataclass
class DyingGrid(InProcessGrid):
    """The in-process grid where a site dies on the message `dies_on` picks: code it runs raises SiteKilled while
    ARMED, and from then on it answers nothing."""

    dies_on: Callable[[str, Message], bool] = lambda site, message: False
    dead: set[int] = field(default_factory=set)

    def handle(self, node: int, delivered: Message) -> Message | None:
        if node in self.dead:
            return None
        ARMED["now"] = self.dies_on(self.contexts[node].node_config["site-id"], delivered)
        try:
            return super().handle(node, delivered)
        except SiteKilled:
            self.dead.add(node)
            return None
        finally:
            ARMED["now"] = False


def masking_stage_at_victims(site: str, message: Message) -> bool:
    config = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return site in VICTIMS and config is not None and str(config[Key.STAGE]) == Stage.COLLECT_MASKED_VECTORS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Four sites with records and a stored phase-A global model (untrained: phases B and C only need one)."""
    root = tmp_path_factory.mktemp("faults")
    for i, site in enumerate(SITES):
        data = write_records(root / "data" / site, women=14, seed=100 + i)
        phase_a = SitePhaseA(site, data, root / "sites" / site, CFG, policy=SitePolicy())
        phase_a.store_global(model_state(new_model(CFG, phase_a.profile)), 1, RUN)
    return root


def consortium(prepared: Path, tmp_path: Path, monkeypatch, **policy) -> tuple[DyingGrid, SiteRoster]:
    """A fresh copy of the prepared sites (fresh ledgers), the real ClientApp, and victims that die while
    computing their phase B or C vector (before it is charged)."""
    shutil.copytree(prepared, tmp_path / "c")
    monkeypatch.setattr(phase_c_module, "site_llm", lambda settings=None, site_dir=None: ListingLLM())

    def die_if_armed(real):
        def wrapped(*args, **kwargs):
            if ARMED["now"]:
                raise SiteKilled()
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(PhaseBSite, "release", die_if_armed(PhaseBSite.release))
    monkeypatch.setattr(SitePhaseC, "round", die_if_armed(SitePhaseC.round))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    nodes = [{"data-dir": str(tmp_path / "c" / "data" / s), "site-id": s, "site-dir": str(site_dir(tmp_path, s)),
              **{f"policy-{k}": v for k, v in policy.items()}} for s in SITES]
    grid = DyingGrid(client_app, nodes, {}, dies_on=masking_stage_at_victims)
    ids = list(grid.get_node_ids())
    return grid, SiteRoster(ids, min_sites=2, names=dict(zip(ids, SITES)))


def site_dir(tmp_path: Path, site: str) -> Path:
    return tmp_path / "c" / "sites" / site


def ledger_of(tmp_path: Path, site: str) -> SiteLedger:
    return SiteLedger(site_dir(tmp_path, site), site)


def charged(tmp_path: Path, site: str, phase: str) -> list[int]:
    """The rounds of `phase` this site's ledger charged, each as often as it was charged."""
    return [e["round"] for e in ledger_of(tmp_path, site).entries() if e["kind"] == "release" and e["phase"] == phase]


def spy_on_secure_sums(monkeypatch, module) -> list:
    results = []
    real = module.secure_sum_over

    def secure_sum_over(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, "secure_sum_over", secure_sum_over)
    return results


def kept_total(tmp_path: Path, phase: str, round: int, sites) -> np.ndarray:
    return sum(np.load(kept_path(ledger_of(tmp_path, s), phase, round, RUN))["values"] for s in sites)


RECORDS = {"phase_a": ConfigRecord(CFG.to_record())}
PROFILE = load_profile(CFG.profile)
CONCEPTS = [c.id for c in PROFILE.concepts]


def phase_b(grid, roster):
    return run_phase_b(grid, roster, PhaseBConfig(prototypes=3, rounds=1, min_count=2), RUN, CONCEPTS, CFG.dim,
                       PROFILE.horizon_days, site_records=RECORDS, secure=True, timeout=120)


def phase_c(grid, roster):
    return run_phase_c(grid, roster, PhaseCConfig(rounds=1, sampling_rate=1.0, points_per_site=8), RUN, CFG.dim,
                       site_records=RECORDS, secure=True, timeout=120)


def assert_survivors_refused_the_smaller_group(tmp_path: Path, roster: SiteRoster, phase: str) -> None:
    survivors = [s for s in SITES if s not in VICTIMS]
    dropped = roster.summary()["dropped"]
    assert set(dropped) == set(SITES)  # the victims went silent, the survivors refused the retry
    for site in survivors:
        assert "smaller_group_retry" in dropped[site]["reason"], dropped[site]
        ledger = ledger_of(tmp_path, site)
        assert charged(tmp_path, site, phase) == [0] and verify_ledger(ledger.path).ok  # charged once, not twice
        refusal = [e for e in ledger.entries() if e["kind"] == "policy_refusal"]
        assert len(refusal) == 1 and refusal[0]["limit"] == "smaller_group_retry" and refusal[0]["phase"] == phase
    for site in VICTIMS:
        assert charged(tmp_path, site, phase) == []  # died before charging


def test_phase_b_release_retried_to_a_smaller_group_is_refused_by_default(prepared, tmp_path, monkeypatch):
    grid, roster = consortium(prepared, tmp_path, monkeypatch)
    with pytest.raises(TooFewSites, match="smaller_group_retry"):
        phase_b(grid, roster)
    assert_survivors_refused_the_smaller_group(tmp_path, roster, "phase_b")


def test_phase_c_round_retried_to_a_smaller_group_is_refused_by_default(prepared, tmp_path, monkeypatch):
    grid, roster = consortium(prepared, tmp_path, monkeypatch)
    with pytest.raises(TooFewSites, match="smaller_group_retry"):
        phase_c(grid, roster)
    assert_survivors_refused_the_smaller_group(tmp_path, roster, "phase_c")


@pytest.mark.parametrize("phase", ["phase_b", "phase_c"])
def test_a_retry_with_the_sites_consent_resends_the_kept_releases_charged_once(prepared, tmp_path, monkeypatch,
                                                                               phase):
    """With `policy-smaller-group-retry=true` the survivors re-send what they kept: the retried round's total is
    the sum of their kept noisy vectors, the phase finishes with them, and every round is charged once."""
    grid, roster = consortium(prepared, tmp_path, monkeypatch, **{"smaller-group-retry": "true"})
    sums = spy_on_secure_sums(monkeypatch, server_phase_b if phase == "phase_b" else server_phase_c)
    (phase_b if phase == "phase_b" else phase_c)(grid, roster)
    survivors = [s for s in SITES if s not in VICTIMS]
    assert roster.summary()["completed"] == survivors and set(roster.summary()["dropped"]) == set(VICTIMS)
    first = sums[0]
    assert first.attempts == 2 and first.secure and [roster.name(n) for n in first.sites] == survivors
    assert np.max(np.abs(first.total - kept_total(tmp_path, phase, 0, survivors))) <= first.quantization_bound
    for site in survivors:
        assert charged(tmp_path, site, phase) == ([0, 1] if phase == "phase_b" else [0])  # each round once
        assert verify_ledger(ledger_of(tmp_path, site).path).ok
        assert not [e for e in ledger_of(tmp_path, site).entries() if e["kind"] == "policy_refusal"]
    for site in VICTIMS:
        assert charged(tmp_path, site, phase) == []


# -- a site that hangs past round-timeout -------------------------------------------------------------------

@dataclass
class GridWithAHungSite(InProcessGrid):
    """Waits for replies as a SuperLink's grid does: until every node asked has answered or `timeout` is over.
    The site `hangs_on` picks never answers (from that message on), so the call waits out its timeout, and fails
    the test if there is none (the real coordinator would wait forever). Every timeout passed is kept."""

    hangs_on: Callable[[str, Message], bool] = lambda site, message: False
    hung: set[int] = field(default_factory=set)
    timeouts: list[tuple[str, float | None]] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        started = time.monotonic()
        self.timeouts.append((messages[0].metadata.message_type if messages else "", timeout))
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.hung or self.hangs_on(self.contexts[node].node_config["site-id"], msg):
                self.hung.add(node)
                continue
            replies += self.pull_messages(self.push_messages([msg]))
        if len(replies) < len(messages):
            if timeout is None:
                raise AssertionError("the coordinator waits without a timeout for a site that hangs")
            time.sleep(max(0.0, started + timeout - time.monotonic()))
            self.waited.append(time.monotonic() - started)
        return replies


def test_a_site_that_hangs_past_round_timeout_is_dropped_and_the_run_goes_on(prepared, tmp_path):
    from pmlm.server.server_app import app as server_app

    shutil.copytree(prepared, tmp_path / "c")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    sites = SITES[:3]
    nodes = [{"data-dir": str(tmp_path / "c" / "data" / s), "site-id": s,
              "site-dir": str(tmp_path / "fresh" / s)} for s in sites]
    timeout = 4.0
    run = {"num-server-rounds": 2, "local-epochs": 1, "phase-a-epsilon": 1.5, "dim": 16, "max-history": 16,
           "points-per-patient": 4, "evaluate-each-round": False, "min-nodes": 2, "round-timeout": timeout,
           "workdir": str(tmp_path / "work")}

    def hangs(site: str, message: Message) -> bool:
        config = message.content.config_records.get("config")
        return (site == "hospital_b" and message.metadata.message_type == "train" and config is not None
                and int(config.get("server-round", -1)) == 2)

    grid = GridWithAHungSite(client_app, nodes, run, hangs_on=hangs)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run))
    server_app(grid, context)

    summary = json.loads(context.state["phase-a-result"]["json"])
    dropped = summary["roster"]["dropped"]
    assert list(dropped) == ["hospital_b"] and dropped["hospital_b"]["round"] == 2
    assert "no reply within the timeout" in dropped["hospital_b"]["reason"]
    assert summary["roster"]["completed"] == ["hospital_a", "hospital_c"] and summary["sites_stored"] == 2
    # Every message of phase A went out with the run's round-timeout; the round with the hung site waited it out.
    assert {t for _, t in grid.timeouts} == {timeout}, grid.timeouts
    assert len(grid.waited) == 1 and timeout <= grid.waited[0] < timeout + 60
    # The hung site never trained round 2: its ledger charged round 1 only; the others charged both.
    name = summary["run"]
    for site, rounds in (("hospital_a", [1, 2]), ("hospital_b", [1]), ("hospital_c", [1, 2])):
        ledger = SiteLedger(tmp_path / "fresh" / site, site)
        assert [e["round"] for e in ledger.entries() if e["kind"] == "release" and e["run_id"] == name] == rounds
    assert Counter(n for n, _ in grid.outbox)[next(n for n, c in grid.contexts.items()
                                                  if c.node_config["site-id"] == "hospital_b")] == 1
