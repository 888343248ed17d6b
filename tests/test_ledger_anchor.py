"""The coordinator's anchor on each site's ledger: it keeps the site's countersigned head, asks each site only for
its entries from that head on, and fails the run loudly when a site's ledger no longer holds the head (truncated,
rewritten or re-keyed), or when its own copy was cut short.

The sites answer through the real ClientApp handler (`query.ledger_entries`) over the in-process grid; only the
lookup of the site's phase-A state is replaced by its site directory and budget (no records are needed here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from pmlm.common.privacy import AccountantSettings, BudgetConfig, GaussianRelease, SiteLedger
from pmlm.server.in_process import RUN_ID, InProcessGrid
from pmlm.server.ledger_copy import LEDGER_COPIES_DIR
from pmlm.server.server_app import LedgerCopiesRejected, copy_site_ledgers, run_later_phases
from pmlm.server.ledger_copy import CoordinatorLedgerCopy, CopyRejected, read_head
from pmlm.server.roster import SiteRoster

BUDGET = BudgetConfig(4.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.3, "phase_c": 0.2})
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)
SITES = ("hospital-a", "hospital-b")


@pytest.fixture
def consortium(tmp_path, monkeypatch):
    """Two sites with a few releases each, an in-process grid to reach them, and the coordinator's workdir."""
    from pmlm.client import client_app as handlers
    from pmlm.client.client_app import app as client_app

    budgets = {s: BUDGET for s in SITES}  # each site's own configured budget

    def site_of(context, cfg):  # the handler's only need: which site directory, with which budget
        site_id = context.node_config["site-id"]
        budget = budgets[site_id]
        where = SimpleNamespace(site_id=site_id, site_dir=Path(context.node_config["site-dir"]))
        return where, SimpleNamespace(budget=lambda: budget)

    monkeypatch.setattr(handlers, "site_checked", site_of)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    dirs = {s: tmp_path / "sites" / s for s in SITES}
    for site, site_dir in dirs.items():
        release(SiteLedger(site_dir, site, BUDGET, settings=FAST), 0)
    nodes = [{"site-id": s, "site-dir": str(d), "data-dir": str(tmp_path / "data" / s)} for s, d in dirs.items()]
    grid = InProcessGrid(client_app, nodes, {"workdir": str(tmp_path)})
    roster = SiteRoster(list(grid.contexts), min_sites=2)
    return SimpleNamespace(grid=grid, roster=roster, dirs=dirs, budgets=budgets, workdir=tmp_path / "coordinator")


def release(ledger: SiteLedger, round_: int) -> dict:
    return ledger.release("phase_a", GaussianRelease(8.0, 1.0), lambda: None, round=round_, noise_source="test")[1]


def copy_once(c) -> dict:
    return copy_site_ledgers(c.grid, c.roster, {"phase_a": ConfigRecord({"run": "test"})}, c.workdir)


def shipped(c) -> dict[str, list[int]]:
    """The seqs each site sent in the last round of replies."""
    last = c.grid.outbox[-len(SITES):]
    return {str(r.content["config"]["site_id"]): [e["seq"] for e in json.loads(str(r.content["config"]["entries"]))]
            for _, r in last}


def state(c) -> CoordinatorLedgerCopy:
    return CoordinatorLedgerCopy(c.workdir / LEDGER_COPIES_DIR)


def test_a_second_run_fetches_only_the_new_entries_and_keeps_the_head(consortium):
    c = consortium
    assert copy_once(c) == {"hospital-a": 2, "hospital-b": 2}
    assert shipped(c) == {"hospital-a": [0, 1], "hospital-b": [0, 1]}
    release(SiteLedger(c.dirs["hospital-a"], "hospital-a"), 1)

    assert copy_once(c) == {"hospital-a": 1, "hospital-b": 0}  # no rejection from the second run on
    # Each site sent its anchored head back (proof it still holds it), then only what is new.
    assert shipped(c) == {"hospital-a": [1, 2], "hospital-b": [1]}
    copies = state(c)
    for site, last in (("hospital-a", 2), ("hospital-b", 1)):
        head = read_head(copies.head_path(site), copies.public_key)
        ledger_entries = SiteLedger(c.dirs[site], site).entries()
        assert head["seq"] == last and head["copy_records"] == last + 1
        assert head["entry_signature"] == ledger_entries[-1]["signature"]
    assert copy_once(c) == {"hospital-a": 0, "hospital-b": 0}


def test_a_truncated_site_ledger_fails_the_run_naming_the_site(consortium):
    c = consortium
    copy_once(c)
    ledger = SiteLedger(c.dirs["hospital-a"], "hospital-a")
    release(ledger, 1)
    release(ledger, 2)
    copy_once(c)
    path = ledger.path
    path.write_bytes(b"".join(line + b"\n" for line in path.read_bytes().split(b"\n")[:-3]))  # drop the last two
    release(SiteLedger(c.dirs["hospital-b"], "hospital-b"), 1)

    with pytest.raises(LedgerCopiesRejected) as failed:
        copy_once(c)
    assert "site 'hospital-a'" in str(failed.value) and "no longer holds entry 3" in str(failed.value)
    assert set(failed.value.rejected) == {"hospital-a"}
    assert failed.value.result["hospital-b"] == 1  # the honest site's copy was still stored
    assert read_head(state(c).head_path("hospital-a"), None)["seq"] == 3  # the anchor did not move back


def test_a_rekeyed_ledger_with_a_bigger_budget_is_rejected_and_the_run_summary_says_so(consortium):
    c = consortium
    copy_once(c)
    site_dir = c.dirs["hospital-a"]
    shutil.rmtree(site_dir)
    c.budgets["hospital-a"] = BudgetConfig(100.0, 1e-5, BUDGET.shares)  # its configuration rewritten too
    forged = SiteLedger(site_dir, "hospital-a", c.budgets["hospital-a"], settings=FAST)
    release(forged, 0)  # same seqs as before, signed by a new key

    run = {"skip-phase-b": True, "skip-phase-c": True, "secure-aggregation": False}
    cfg = SimpleNamespace(profile="obgyn", run_name="anchor-test", to_record=lambda: {"run": "anchor-test"})
    with pytest.raises(LedgerCopiesRejected, match="site 'hospital-a'.*differs from the one the coordinator anchored"):
        run_later_phases(c.grid, c.roster, cfg, run, c.workdir)
    summary = json.loads((c.workdir / "anchor-test-phases-bc.json").read_text())
    assert summary["ledger_copies"]["hospital-a"].startswith("rejected: ")
    assert summary["ledger_copies"]["hospital-b"] == 0


def test_a_gap_after_the_head_is_rejected(consortium):
    c = consortium
    copy_once(c)
    ledger = SiteLedger(c.dirs["hospital-a"], "hospital-a")
    entries = [release(ledger, r) for r in (1, 2)]
    copies = state(c)
    head = SiteLedger(c.dirs["hospital-a"], "hospital-a").entries()[1]
    with pytest.raises(CopyRejected, match="entry 3 where entry 2 should follow"):
        copies.accept_from_head("hospital-a", [head, entries[1]])  # entry 2 left out
    assert copies.accept_from_head("hospital-a", [head, *entries])[-1]["site_entry"]["seq"] == 3


def test_a_coordinator_copy_cut_short_is_caught_by_its_head(consortium):
    c = consortium
    copy_once(c)
    release(SiteLedger(c.dirs["hospital-a"], "hospital-a"), 1)
    copy_once(c)
    copy_path = state(c).copy_path("hospital-a")
    copy_path.write_bytes(b"".join(line + b"\n" for line in copy_path.read_bytes().split(b"\n")[:-2]))
    with pytest.raises(CopyRejected, match="holds 2 records but its anchored head says 3"):
        state(c).head("hospital-a")
    with pytest.raises(CopyRejected, match="1 records are missing"):
        copy_once(c)
