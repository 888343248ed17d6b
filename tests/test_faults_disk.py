"""A disk that fills up while artifacts, ledgers, keys and reports are written.

`disk_full_after(n)` lets n more bytes reach any file through os.write (the last write partly, as
the kernel does when space runs out), then fails every write with ENOSPC. After the failure the old
file must be intact (or absent if it was new), no temporary file may be left, the error must name
the file, and a ledger must still verify with no entry for the release that failed.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pmlm.cli import main
from pmlm.client.assemble.assembler import load_policy, save_policy
from pmlm.client.egress import EgressLogError, append_egress, egress_log_path, read_egress_log
from pmlm.common.atomic import DurableWriteError, write_atomic
from pmlm.common.peer_profiles import PeerProfiles
from pmlm.common.assemble.policy import PromptPolicy
from pmlm.common.privacy import AccountantSettings, BudgetConfig, GaussianRelease, SiteLedger, verify_ledger
from pmlm.common.privacy.signing import load_or_create_private_key, load_public_key
from pmlm.reports.demo import write_report
from pmlm.server.ledger_copy import CoordinatorLedgerCopy, read_copy

BUDGET = BudgetConfig(4.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.5})
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)


@pytest.fixture
def disk_full_after(monkeypatch):
    real_write = os.write

    @contextmanager
    def filling(free_bytes: int):
        left = free_bytes

        def write(fd, data):
            nonlocal left
            if left <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = min(len(data), left)
            left -= n
            return real_write(fd, bytes(data[:n]))

        monkeypatch.setattr(os, "write", write)
        try:
            yield
        finally:
            monkeypatch.setattr(os, "write", real_write)

    return filling


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (lock files aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}


def assert_enospc(caught, path: Path, kept: str) -> None:
    assert isinstance(caught.value, DurableWriteError) and caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert str(path) in message and "No space left on device" in message and kept in message


# -- whole-file artifacts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("free", [0, 1, 700, 10_000])
def test_a_policy_artifact_is_old_or_new_never_torn(tmp_path, disk_full_after, free):
    old = PromptPolicy(8)
    path = save_policy(old, tmp_path, {"round": 1})
    before = snapshot(tmp_path)
    with disk_full_after(free), pytest.raises(DurableWriteError) as caught:
        save_policy(PromptPolicy(8), tmp_path, {"round": 2})
    assert_enospc(caught, path, "previous version is unchanged")
    assert snapshot(tmp_path) == before  # same bytes, and no temporary file beside it
    reloaded = load_policy(tmp_path)
    assert all((a == b).all() for a, b in zip(reloaded.state_dict().values(), old.state_dict().values()))


def test_a_new_artifact_is_absent_after_a_full_disk(tmp_path, disk_full_after):
    with disk_full_after(100), pytest.raises(DurableWriteError) as caught:
        write_atomic(tmp_path / "phase_a" / "current.json", json.dumps({"path": "x" * 1000}))
    assert_enospc(caught, tmp_path / "phase_a" / "current.json", "no file was created")
    assert list((tmp_path / "phase_a").iterdir()) == []


def test_peer_profiles_keep_the_previous_release_when_the_disk_fills(tmp_path, disk_full_after):
    def profiles(scale: float) -> PeerProfiles:
        return PeerProfiles(np.eye(3) * scale, np.array([40.0, 50.0, 2.0]), np.full((3, 4), 0.25 * scale),
                            np.array([False, False, True]), 1.5, ["a", "b", "c", "d"], 84, 10)

    path = tmp_path / "phase_b" / "peer_profiles"
    profiles(1.0).save(path)
    before = snapshot(tmp_path)
    with disk_full_after(300), pytest.raises(DurableWriteError):
        profiles(2.0).save(path)
    assert snapshot(tmp_path) == before
    assert np.allclose(PeerProfiles.load(path).rates, 0.25)


def test_a_report_on_a_full_disk_keeps_the_last_report(tmp_path, disk_full_after):
    out = tmp_path / "report"
    first = {"data": {"patients": 3, "sites": 1, "prediction_points": 5, "test_points": 2},
             "llm": {"model": "m", "calls": 1, "cached": 0},
             "runtime_s": {"total": 1, "phase_a": 0, "phase_b": 0, "phase_c": 0, "evaluation": 1},
             "guidance": {"general": {"precision": 0.1, "recall": 0.2, "f1": 0.1, "risk_recall": 0.0}},
             "recommender": {"federated_dp": {"recall@5": 0.5, "ndcg@5": 0.4, "auroc": 0.7}},
             "privacy": {"delta": 1e-5, "sites": {"s": {"epsilon": 1.0, "epsilon_rdp": 1.2, "budget": 3.0,
                                                        "releases": 2}}},
             "examples": [], "note": "first"}
    json_path, _ = write_report(first, out)
    before = snapshot(out)
    with disk_full_after(20), pytest.raises(DurableWriteError) as caught:
        write_report({**first, "note": "second"}, out)
    assert_enospc(caught, json_path, "previous version is unchanged")
    assert snapshot(out) == before


def test_the_cli_says_the_disk_is_full_and_exits_2(tmp_path, disk_full_after, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.json").write_text("{not json")
    out = tmp_path / "quarantine.jsonl"
    with disk_full_after(10):
        code = main(["data", "validate", str(data), "--quarantine-out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "pmlm: error:" in err and str(out) in err and "No space left on device" in err
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_site_key_is_never_left_half_written(tmp_path, disk_full_after):
    key_path = tmp_path / "keys" / "site_ed25519.key"
    with disk_full_after(30), pytest.raises(DurableWriteError):
        load_or_create_private_key(key_path)
    assert list(key_path.parent.iterdir()) == []  # no half key to trip over at the next start
    key = load_or_create_private_key(key_path)
    assert load_public_key(Path(str(key_path) + ".pub")).public_bytes_raw() == key.public_key().public_bytes_raw()


# -- append-only ledgers ------------------------------------------------------------------------------------

@pytest.fixture
def ledger(tmp_path) -> SiteLedger:
    ledger = SiteLedger(tmp_path / "site", "site-1", BUDGET, settings=FAST)
    ledger.record("phase_a", GaussianRelease(8.0, 1.0), round=0)
    return ledger


@pytest.mark.parametrize("free", [0, 1, 200, 600])
def test_a_release_that_cannot_be_written_is_not_in_the_ledger(ledger, disk_full_after, free):
    before = ledger.path.read_bytes()
    spent = ledger.spent()
    drawn = []
    with disk_full_after(free), pytest.raises(DurableWriteError) as caught:
        ledger.release("phase_a", GaussianRelease(8.0, 1.0), lambda: drawn.append(1) or [0.5], round=1)
    assert_enospc(caught, ledger.path, "partial write was removed")
    assert drawn == [1]  # the noise was drawn, but release() raised: the caller sends nothing
    assert ledger.path.read_bytes() == before  # no torn last line
    assert verify_ledger(ledger.path, load_public_key(ledger.public_key_path)).ok
    assert ledger.spent() == spent
    # A restart finds a clean ledger (no torn-tail recovery needed), and round 1 is charged exactly once.
    again = SiteLedger(ledger.site_dir, "site-1", BUDGET, settings=FAST)
    again.record("phase_a", GaussianRelease(8.0, 1.0), round=1)
    entries = again.entries()
    assert [(e["kind"], e.get("round")) for e in entries] == [("open", None), ("release", 0), ("release", 1)]
    assert verify_ledger(ledger.path).ok


def test_a_failed_fsync_also_takes_the_entry_back(ledger, monkeypatch):
    before = ledger.path.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(DurableWriteError, match="Input/output error"):
            ledger.record("phase_a", GaussianRelease(8.0, 1.0), round=1)
    assert ledger.path.read_bytes() == before
    ledger.record("phase_a", GaussianRelease(8.0, 1.0), round=1)  # the same object carries on
    assert verify_ledger(ledger.path).ok


def test_the_coordinators_copy_is_not_torn_by_a_full_disk(ledger, tmp_path, disk_full_after):
    coordinator = CoordinatorLedgerCopy(tmp_path / "coordinator")
    entries = ledger.entries()
    coordinator.accept("site-1", entries[:1])
    copy_path = coordinator.copy_path("site-1")
    before = copy_path.read_bytes()
    with disk_full_after(100), pytest.raises(DurableWriteError):
        coordinator.accept("site-1", entries[1:])
    assert copy_path.read_bytes() == before
    coordinator.accept("site-1", entries[1:])  # shipped again once there is room: accepted once
    held, problems, _ = read_copy(copy_path, coordinator.public_key, coordinator.site_key("site-1"))
    assert problems == [] and [e["seq"] for e in held.entries] == [0, 1]


def test_the_egress_log_keeps_whole_lines_when_the_disk_fills(tmp_path, disk_full_after):
    append_egress(tmp_path, {"kind": "first"})
    before, read_before = egress_log_path(tmp_path).read_bytes(), read_egress_log(tmp_path)
    with disk_full_after(5), pytest.raises(EgressLogError, match="No space left on device.*partial write was removed"):
        append_egress(tmp_path, {"kind": "second", "pad": "x" * 100})
    assert egress_log_path(tmp_path).read_bytes() == before
    assert read_egress_log(tmp_path) == read_before  # no torn line for the reader to trip over
