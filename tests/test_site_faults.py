"""Faults at the sites: a round asked for twice is charged once; a site killed mid-round is dropped, the run goes on
with the others or stops naming it, and every ledger holds exactly the releases that were made.

In-process (no Ray, no deployment): a site is "killed" by an exception it cannot answer from, raised inside the
code it is running (DP-SGD, after recording, computing a SecAgg+ vector); the grid then never delivers to it
again. About 50 s of CPU (2 minutes of wall time on two cores shared with other jobs).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from pmlm.common.privacy import AlreadyReleased, AccountantSettings, BudgetConfig, GaussianRelease, SiteLedger
from pmlm.common.privacy.kept import kept_path, release_once, request_digest
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.client.secure_sum import attach_secure_sum, vector_task
from pmlm.server.in_process import RUN_ID, InProcessGrid
from pmlm.server.roster import SiteRoster, TooFewSites
from pmlm.server.secure_sum import secure_sum_over

logging.getLogger("absl").setLevel(logging.ERROR)
BUDGET = BudgetConfig(4.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.3, "phase_c": 0.2})
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)


def releases(ledger: SiteLedger) -> list[dict]:
    return [e for e in ledger.entries() if e["kind"] == "release"]


def no_round_charged_twice(entries: list[dict]) -> bool:
    keys = Counter((e["run_id"], e["phase"], e["round"], e["privacy_unit"]) for e in entries if e["kind"] == "release")
    return all(n == 1 for n in keys.values())


# -- the ledger charges a round once ------------------------------------------------------------------

def test_a_round_is_charged_once_and_not_drawn_again(tmp_path):
    ledger = SiteLedger(tmp_path, "hospital-a", BUDGET, settings=FAST, run_id="run-1")
    draws = []
    noisy, first = ledger.release("phase_a", GaussianRelease(8.0, 1.0), lambda: draws.append(1) or 7.0, round=0)
    spent = ledger.spent()
    with pytest.raises(AlreadyReleased, match="round 0 of phase_a in run run-1") as raised:
        ledger.release("phase_a", GaussianRelease(8.0, 1.0), lambda: draws.append(1) or 8.0, round=0)
    assert raised.value.entry["seq"] == first["seq"]
    with pytest.raises(AlreadyReleased):  # phase A prices with check() before training: refused there too
        ledger.check("phase_a", GaussianRelease(8.0, 1.0), round=0)
    # another process (a fresh ClientApp per message) sees the same entry
    with pytest.raises(AlreadyReleased):
        SiteLedger(tmp_path, "hospital-a", run_id="run-1").record("phase_a", GaussianRelease(8.0, 1.0), round=0)
    assert draws == [1] and ledger.spent() == spent
    assert [e["kind"] for e in ledger.entries()] == ["open", "release"]  # no refusal, no second charge
    # the same round number of another run, or a site-level release of the same round, is another release
    ledger.release("phase_a", GaussianRelease(8.0, 1.0), lambda: None, round=0, run_id="run-2")
    ledger.release("phase_a", GaussianRelease(8.0, 1.0, privacy_unit="site"), lambda: None, round=0)
    assert len(releases(ledger)) == 3 and verify_ledger(ledger.path).ok
    assert ledger.release_of("phase_a", 0)["seq"] == first["seq"] and ledger.release_of("phase_a", 1) is None


def test_a_retried_round_gets_its_kept_release_back_without_a_new_charge(tmp_path):
    ledger = SiteLedger(tmp_path, "hospital-a", BUDGET, settings=FAST)
    centroids = np.arange(6.0).reshape(2, 3)
    rng = np.random.default_rng(1)
    draw = lambda: np.ones((2, 4)) + rng.normal(0, 5.0, (2, 4))  # noqa: E731
    values, entry = release_once(ledger, "phase_b", GaussianRelease(5.0, 1.0), draw, round=0, run_id="run-1",
                                 request=request_digest(centroids), noise_source="test")
    spent, state = ledger.spent(), rng.bit_generator.state
    # a retry, in a fresh process: the same noisy values and the same entry, nothing drawn, nothing charged
    again = SiteLedger(tmp_path, "hospital-a")
    values2, entry2 = release_once(again, "phase_b", GaussianRelease(5.0, 1.0), draw, round=0, run_id="run-1",
                                   request=request_digest(centroids.copy()), noise_source="test")
    assert np.array_equal(values, values2) and entry2 == entry
    assert rng.bit_generator.state == state and again.spent() == spent and len(releases(again)) == 1
    # the same round asked with other centroids would need a fresh release: refused
    with pytest.raises(AlreadyReleased, match="different request"):
        release_once(again, "phase_b", GaussianRelease(5.0, 1.0), draw, round=0, run_id="run-1",
                     request=request_digest(centroids + 1), noise_source="test")
    assert len(releases(again)) == 1 and verify_ledger(again.path).ok


def test_a_release_kept_but_never_recorded_was_never_sent_and_is_drawn_afresh(tmp_path):
    """A crash between keeping the noisy values and recording the entry: nothing left the site, nothing was charged."""
    ledger = SiteLedger(tmp_path, "hospital-a", BUDGET, settings=FAST)
    path = kept_path(ledger, "phase_b", 0, "run-1")
    path.parent.mkdir(parents=True)
    np.savez(path, values=np.full(3, 99.0), request=np.array("stale"))
    values, entry = release_once(ledger, "phase_b", GaussianRelease(5.0, 1.0), lambda: np.zeros(3), round=0,
                                 run_id="run-1", request="fresh", noise_source="test")
    assert np.array_equal(values, np.zeros(3)) and entry["seq"] == 1
    assert release_once(ledger, "phase_b", GaussianRelease(5.0, 1.0), lambda: np.ones(3), round=0, run_id="run-1",
                        request="fresh", noise_source="test")[0].tolist() == [0.0, 0.0, 0.0]


# -- a site killed mid-round, in-process ----------------------------------------------------------------

class SiteKilled(BaseException):
    """The site's process is gone: nothing more leaves it (a BaseException, so no handler turns it into a reply)."""


ARMED = {"now": False}  # set while the victim handles the message it dies on


@dataclass
class GridWithAKilledSite(InProcessGrid):
    """The in-process grid, where a site dies while handling the message `dies_on(site id, message)` picks: the
    patched code it runs raises SiteKilled while ARMED, and the site answers nothing from then on (as if its
    SuperNode was killed)."""

    dies_on: Callable[[str, Message], bool] = lambda site, message: False
    dead: set[int] = field(default_factory=set)
    delivered: list[tuple[int, Message]] = field(default_factory=list)

    def handle(self, node: int, delivered: Message) -> Message | None:
        if node in self.dead:
            return None
        self.delivered.append((node, delivered))
        ARMED["now"] = self.dies_on(self.contexts[node].node_config["site-id"], delivered)
        try:
            return super().handle(node, delivered)
        except SiteKilled:
            self.dead.add(node)
            return None
        finally:
            ARMED["now"] = False


def in_round(site: str, message_type: str, server_round: int) -> Callable[[str, Message], bool]:
    def dies(at_site: str, message: Message) -> bool:
        config = message.content.config_records.get("config")
        return (at_site == site and message.metadata.message_type == message_type and config is not None
                and int(config.get("server-round", -1)) == server_round)
    return dies


RUN = {"local-epochs": 1, "phase-a-epsilon": 1.5, "batch-size": 4, "dim": 16, "max-history": 16,
       "points-per-patient": 4, "evaluate-each-round": False, "min-nodes": 2}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> dict[str, Path]:
    from pmlm.deploy.local import quick_slice

    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    # The three hospitals: the tests below name them and count survivors (the small clinics add nothing here).
    sites = {p.name: p for p in sorted(sample.glob("hospital_*")) if p.is_dir()} if sample.is_dir() else {}
    if len(sites) < 3:
        pytest.skip("the bundled sample consortium is not present")
    return quick_slice(sites, tmp_path_factory.mktemp("data"), patients=12)


def run_with_a_killed_site(consortium: dict[str, Path], workdir: Path, sites: list[str], run: dict, **kill):
    from pmlm.client.client_app import app as client_app
    from pmlm.server.server_app import app as server_app

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    nodes = [{"data-dir": str(consortium[s]), "site-id": s, "site-dir": str(workdir / "sites" / s)} for s in sites]
    run = {**RUN, **run, "workdir": str(workdir)}
    grid = GridWithAKilledSite(client_app, nodes, run, **kill)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run))
    return grid, context, lambda: server_app(grid, context)


def site_ledger(workdir: Path, site: str) -> SiteLedger:
    return SiteLedger(workdir / "sites" / site, site)


def phase_a_rounds(ledger: SiteLedger, run_name: str) -> list[int]:
    return [e["round"] for e in releases(ledger) if e["phase"] == "phase_a" and e["run_id"] == run_name]


def kill_while_training(monkeypatch) -> None:
    """The armed site dies inside DP-SGD: after its budget check, before its release is recorded."""
    from pmlm.client import phase_a

    real_train_local = phase_a.train_local

    def train_local(*args, **kwargs):
        if ARMED["now"]:
            raise SiteKilled()
        return real_train_local(*args, **kwargs)

    monkeypatch.setattr(phase_a, "train_local", train_local)


def test_a_site_killed_while_training_is_dropped_and_the_run_goes_on_with_the_others(consortium, tmp_path,
                                                                                        monkeypatch):
    kill_while_training(monkeypatch)
    sites = sorted(consortium)
    later = {"phases": "ab", "phase-b-rounds": 1, "phase-b-prototypes": 3, "phase-b-min-count": 5}
    grid, context, run = run_with_a_killed_site(consortium, tmp_path, sites, {"num-server-rounds": 2, **later},
                                                dies_on=in_round("hospital_b", "train", 2))
    run()

    summary = json.loads(context.state["phase-a-result"]["json"])
    name = summary["run"]
    assert summary["roster"]["completed"] == ["hospital_a", "hospital_c"] and summary["sites_stored"] == 2
    assert summary["roster"]["dropped"]["hospital_b"]["phase"] == "phase_a"
    assert summary["roster"]["dropped"]["hospital_b"]["round"] == 2
    assert "no reply" in summary["roster"]["dropped"]["hospital_b"]["reason"]
    on_disk = json.loads((tmp_path / "coordinator" / f"{name}.json").read_text())
    assert on_disk["roster"] == summary["roster"]
    # phase B ran under SecAgg+ with the two survivors; nobody asked the dead site anything after it died
    phase_b = json.loads(context.state["phases-bc-result"]["json"])
    assert phase_b["secure_aggregation"] and phase_b["roster"] == summary["roster"]
    assert set(phase_b["ledger_copies"]) == {"hospital_a", "hospital_c"}
    victim = next(n for n, c in grid.contexts.items() if c.node_config["site-id"] == "hospital_b")
    assert [d.metadata.message_type for n, d in grid.delivered if n == victim] == ["train", "train"]

    # the killed site charged round 1 only: no entry for the round it never answered
    killed = site_ledger(tmp_path, "hospital_b")
    assert phase_a_rounds(killed, name) == [1] and verify_ledger(killed.path).ok
    assert not (tmp_path / "sites" / "hospital_b" / "phase_a" / "current.json").exists()
    assert not [e for e in releases(killed) if e["phase"] == "phase_b"]
    for site in ("hospital_a", "hospital_c"):
        ledger = site_ledger(tmp_path, site)
        assert phase_a_rounds(ledger, name) == [1, 2]
        assert [e["round"] for e in releases(ledger) if e["phase"] == "phase_b"] == [0, 1]  # k-means, then profiles
        assert verify_ledger(ledger.path).ok and no_round_charged_twice(ledger.entries())
        stored = json.loads((tmp_path / "sites" / site / "phase_a" / "current.json").read_text())
        assert stored["round"] == 2 and stored["ledger_release"]["seq"] == ledger.release_of("phase_a", 2, name)["seq"]


def test_too_few_sites_left_stops_the_run_naming_the_site_and_a_resent_round_is_not_charged_twice(
        consortium, tmp_path, monkeypatch):
    from pmlm.client.phase_a import SitePhaseA

    def train_round(self, *args, **kwargs):
        out = real_train_round(self, *args, **kwargs)
        if ARMED["now"]:
            raise SiteKilled()  # after the release was recorded, before the reply left
        return out

    real_train_round = SitePhaseA.train_round
    monkeypatch.setattr(SitePhaseA, "train_round", train_round)
    grid, context, run = run_with_a_killed_site(consortium, tmp_path, ["hospital_a", "hospital_b"],
                                                {"num-server-rounds": 1}, dies_on=in_round("hospital_b", "train", 1))
    with pytest.raises(TooFewSites, match=r"phase_a round 1: 1 of 2 sites left.*hospital_b \(phase_a round 1: no reply"):
        run()
    (failed,) = (tmp_path / "coordinator").glob("*-failed.json")
    report = json.loads(failed.read_text())
    assert "TooFewSites" in report["error"] and list(report["roster"]["dropped"]) == ["hospital_b"]
    name = report["run"]
    # Recorded before sending: the dead site's ledger keeps the release whose reply never left (over-counted).
    killed = site_ledger(tmp_path, "hospital_b")
    assert phase_a_rounds(killed, name) == [1] and verify_ledger(killed.path).ok
    assert not any((tmp_path / "sites" / s / "phase_a" / "current.json").exists() for s in ("hospital_a", "hospital_b"))

    # The coordinator re-sends round 1 to the site once it is back: refused, not trained and charged again.
    grid.dead.clear()
    node, train = next((n, d) for n, d in grid.delivered if d.metadata.message_type == "train"
                       and grid.contexts[n].node_config["site-id"] == "hospital_b")
    spent = killed.spent()
    (answer,) = grid.send_and_receive([Message(content=train.content, dst_node_id=node, message_type="train")])
    assert answer.has_error() and "AlreadyReleased" in answer.error.reason
    assert phase_a_rounds(killed, name) == [1] and killed.spent() == spent
    assert no_round_charged_twice(killed.entries())


# -- a secure sum that halted after the sites had released: the retry resends, nobody pays twice ----------

def secagg_stage(message: Message) -> str:
    config = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(config[Key.STAGE]) if config is not None else ""


@vector_task("test_faults_kept_release")
def kept_noisy_vector(config: dict, context: Context, arrays: dict) -> np.ndarray:
    if ARMED["now"]:
        raise SiteKilled()  # computing its vector, before charging it
    site = str(context.node_config["site-id"])
    ledger = SiteLedger(Path(str(context.node_config["site-dir"])), site, BUDGET, settings=FAST)
    rng = np.random.default_rng()
    values, _ = release_once(ledger, "phase_b", GaussianRelease(8.0, 1.0), lambda: arrays["x"] + rng.normal(0, 8.0, 3),
                             round=int(config["round"]), run_id="run-1", request=request_digest(arrays["x"]),
                             noise_source="test")
    return values


def test_a_secure_sum_retried_after_it_halted_resends_the_kept_releases(tmp_path):
    """Four sites, two die while computing their vectors: the two survivors' masked vectors cannot be unmasked
    (a key needs 3 shares), the protocol halts, and the retry without the dead asks the survivors for the same
    round again. They resend the release they kept: one ledger entry each, and the total is its sum."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    client_app = ClientApp()
    attach_secure_sum(client_app)
    sites = [f"site_{i}" for i in range(4)]
    grid = GridWithAKilledSite(client_app, [{"site-id": s, "site-dir": str(tmp_path / s)} for s in sites], {},
                               dies_on=lambda site, message: site in ("site_2", "site_3")
                               and secagg_stage(message) == Stage.COLLECT_MASKED_VECTORS)
    roster = SiteRoster(list(grid.get_node_ids()), min_sites=2, names={n: s for n, s in zip(grid.get_node_ids(), sites)})
    result = secure_sum_over(roster, grid, "phase_b", 0, "test_faults_kept_release", {"round": 0}, shape=(3,),
                             arrays={"x": np.array([10.0, 20.0, 30.0])}, timeout=30)
    assert result.attempts == 2 and [roster.name(n) for n in result.sites] == ["site_0", "site_1"]
    assert roster.summary()["completed"] == ["site_0", "site_1"]
    assert set(roster.summary()["dropped"]) == {"site_2", "site_3"}
    # the survivors were asked for round 0 twice (two masking stages) and charged it once; the dead never charged
    for site in ("site_0", "site_1"):
        ledger = SiteLedger(tmp_path / site, site)
        assert [e["round"] for e in releases(ledger)] == [0] and verify_ledger(ledger.path).ok
    assert not any((tmp_path / s / "ledger").exists() for s in ("site_2", "site_3"))
    kept = sum(np.load(kept_path(SiteLedger(tmp_path / s, s), "phase_b", 0, "run-1"))["values"]
               for s in ("site_0", "site_1"))
    assert np.max(np.abs(result.total - kept)) <= result.quantization_bound


def test_with_hospital_level_dp_a_lost_site_stops_the_run(consortium, tmp_path, monkeypatch):
    """Flower scales hospital-level noise to the number of sites the run started with: going on with fewer would
    weaken that guarantee, so the roster requires every site (without hospital DP this run would go on with two)."""
    kill_while_training(monkeypatch)
    _, _, run = run_with_a_killed_site(consortium, tmp_path, sorted(consortium),
                                       {"num-server-rounds": 1, "hospital-dp-noise": 0.5, "hospital-dp-clip": 10.0},
                                       dies_on=in_round("hospital_c", "train", 1))
    with pytest.raises(TooFewSites, match=r"2 of 3 sites left, fewer than the 3 the run needs; dropped: hospital_c"):
        run()
