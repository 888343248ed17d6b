"""The site ledger: charging, refusals before noise, persistence, crash detection, tamper evidence,
and the coordinator's countersigned copy."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pmlm.common.privacy import (
    AccountantSettings,
    BudgetConfig,
    BudgetExhausted,
    DpSgd,
    GaussianRelease,
    LedgerConfigMismatch,
    LedgerCorrupted,
    LedgerTornTail,
    SiteLedger,
    UnknownPhase,
    verify_ledger,
)
from pmlm.common import atomic
from pmlm.common.privacy.signing import (
    SITE_ENTRY_DOMAIN,
    KeyFileError,
    canonical_json,
    key_fingerprint,
    line_hash,
    load_or_create_private_key,
    load_public_key,
    public_key_b64,
    sign,
)
from pmlm.server.ledger_copy import CoordinatorLedgerCopy, CopyRejected, read_copy

DELTA = 1e-5
BUDGET = BudgetConfig(4.0, DELTA, {"phase_a": 0.5, "phase_b": 0.3, "phase_c": 0.2})  # caps 2, 1.2, 0.8
# Coarser PLD grid for the tamper tests, which verify the same ledger many times.
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)


class NoiseSpy:
    """A stand-in for drawing noise that remembers whether it was asked to."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return [0.1, -0.2]


def direct_epsilon(events, interval=1e-3):
    pld = PLDAccountant(value_discretization_interval=interval)
    rdp = RdpAccountant()
    for event in events:
        pld.compose(event)
        rdp.compose(event)
    return pld.get_epsilon(DELTA), rdp.get_epsilon(DELTA)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def resign(entry: dict, key: Ed25519PrivateKey, prev_hash: str | None = None) -> bytes:
    entry = {k: v for k, v in entry.items() if k != "signature"}
    if prev_hash is not None:
        entry["prev_hash"] = prev_hash
    entry["signature"] = sign(key, SITE_ENTRY_DOMAIN, canonical_json(entry))
    return canonical_json(entry)


@pytest.fixture
def site(tmp_path):
    return tmp_path / "hospital-a"


@pytest.fixture
def small_ledger(tmp_path):
    """open, 2 Gaussian releases, 1 refusal, 1 site-level release, 1 DP-SGD release (last: slowest to re-price)."""
    ledger = SiteLedger(tmp_path / "site", "site-1", BudgetConfig(4.0, DELTA, {"phase_a": 0.5, "phase_b": 0.5}),
                        settings=FAST)
    ledger.record("phase_a", GaussianRelease(5.0, 1.0), round=0)
    ledger.record("phase_a", GaussianRelease(5.0, 1.0), round=1)
    with pytest.raises(BudgetExhausted):
        ledger.record("phase_b", GaussianRelease(0.5, 1.0), round=0)
    ledger.record("phase_a", GaussianRelease(3.0, 1.0, privacy_unit="site"), round=0)
    ledger.record("phase_b", DpSgd(2.0, 0.1, 5, 1.0), round=0)
    assert len(lines(ledger.path)) == 6
    return ledger


def test_site_key_is_created_once_with_private_mode(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    key_file = site / "keys" / "site_ed25519.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ledger.public_key_path.is_file()
    fingerprint = ledger.key_fingerprint
    assert SiteLedger(site, "hospital-a", BUDGET).key_fingerprint == fingerprint
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SiteLedger(site, "hospital-a", BUDGET)


def test_a_deleted_ledger_is_not_restarted_while_the_site_key_exists(site):
    from pmlm.common.privacy.ledger import LedgerMissing

    ledger = SiteLedger(site, "hospital-a", BUDGET)
    ledger.record("phase_a", GaussianRelease(5.0, 1.0), round=0)
    fingerprint = ledger.key_fingerprint
    ledger.path.unlink()
    for budget in (BUDGET, None):  # a writer and a reader are both refused
        with pytest.raises(LedgerMissing) as refused:
            SiteLedger(site, "hospital-a", budget)
        message = str(refused.value)
        assert str(ledger.path) in message and str(ledger.key_path) in message and "restore" in message.lower()
    assert not ledger.path.exists()  # nothing was written with the full budget
    # The operator's explicit override starts a new ledger under the same key.
    fresh = SiteLedger(site, "hospital-a", BUDGET, start_over_with_existing_key=True)
    assert fresh.key_fingerprint == fingerprint and [e["kind"] for e in fresh.entries()] == ["open"]


def test_the_key_and_the_open_entry_are_created_together(site, monkeypatch):
    from pmlm.common.privacy import ledger as ledger_module

    with pytest.raises(Exception, match="BudgetConfig is needed"):  # a reader before the first start
        SiteLedger(site, "hospital-a")
    assert not (site / "keys").exists()  # ...leaves no key that would then block the first start

    def crash(*args, **kwargs):
        raise OSError("power lost after the key was written")

    monkeypatch.setattr(SiteLedger, "_create", crash)
    with pytest.raises(OSError, match="power lost"):
        SiteLedger(site, "hospital-a", BUDGET)
    assert (site / "keys" / "site_ed25519.key").exists() and not (site / ledger_module.LEDGER_PATH).exists()
    monkeypatch.undo()
    # The interrupted first start is finished with the key it made, not refused as a deleted ledger.
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    assert ledger.open_entry["key_fingerprint"] == key_fingerprint(
        load_public_key(site / "keys" / "site_ed25519.key.pub"))
    assert not list((site / "ledger").glob("*.starting"))


def test_entries_carry_cumulative_epsilon_equal_to_direct_composition(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET, run_id="run-1")
    plan = [("phase_a", DpSgd(2.0, 0.05, 20, 1.0)), ("phase_a", DpSgd(2.0, 0.05, 20, 1.0)),
            ("phase_b", GaussianRelease(6.0, 2.0, releases=2))]
    events, phase_a_events = [], []
    for round_, (phase, mechanism) in enumerate(plan):
        entry = ledger.record(phase, mechanism, round=round_, population_size=1000,
                              noise_source="test", extra={"model": "seq-v1"})
        events.append(mechanism.to_dp_event())
        if phase == "phase_a":
            phase_a_events.append(mechanism.to_dp_event())
        pld, rdp = direct_epsilon(events)
        assert entry["epsilon"] == pytest.approx(pld, rel=1e-9)
        assert entry["epsilon_rdp"] == pytest.approx(rdp, rel=1e-9)
        assert entry["phase"] == phase and entry["round"] == round_ and entry["run_id"] == "run-1"
        assert entry["delta"] == DELTA and entry["accountant"].startswith("dp-accounting ")
        assert entry["mechanism"] == mechanism.to_dict()
        assert entry["privacy_unit"] == "patient-in-site" and entry["extra"] == {"model": "seq-v1"}
    assert ledger.spent(phase="phase_a").pld == pytest.approx(direct_epsilon(phase_a_events)[0], rel=1e-9)
    assert ledger.spent().pld == pytest.approx(direct_epsilon(events)[0], rel=1e-9)
    stored = [json.loads(line) for line in lines(ledger.path)]
    assert [e["kind"] for e in stored] == ["open", "release", "release", "release"]
    assert all(stored[i]["prev_hash"] == line_hash(lines(ledger.path)[i - 1]) for i in range(1, 4))


def test_refused_release_draws_no_noise_and_is_recorded(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    spy = NoiseSpy()
    noisy, entry = ledger.release("phase_c", GaussianRelease(8.0, 1.0), spy, round=0)
    assert spy.calls == 1 and noisy == [0.1, -0.2] and entry["kind"] == "release"
    spent_before = ledger.spent()
    size_before = ledger.path.stat().st_size

    spy = NoiseSpy()
    with pytest.raises(BudgetExhausted) as refused:
        ledger.release("phase_c", GaussianRelease(0.7, 1.0), spy, round=1)
    assert spy.calls == 0, "noise was drawn for a refused release"
    error = refused.value
    assert error.cap == pytest.approx(0.8) and error.spent == pytest.approx(spent_before.pld)
    assert error.requested > error.remaining
    assert "phase 'phase_c'" in str(error) and "remaining" in str(error) and "requested" in str(error)

    assert ledger.spent() == spent_before  # nothing charged
    refusal = json.loads(lines(ledger.path)[-1])
    assert ledger.path.stat().st_size > size_before
    assert refusal["kind"] == "refusal" and refusal["limit"] == "phase"
    assert refusal["epsilon"] == pytest.approx(spent_before.pld)
    assert refusal["requested"]["phase_epsilon"] > 0.8
    assert verify_ledger(ledger.path, load_public_key(ledger.public_key_path)).ok


def test_check_and_record_refuse_too(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    charge = ledger.check("phase_a", GaussianRelease(20.0, 1.0))
    assert charge.fits and ledger.spent() == (0.0, 0.0)  # checking spends nothing
    assert len(lines(ledger.path)) == 1
    with pytest.raises(BudgetExhausted):
        ledger.check("phase_a", GaussianRelease(0.5, 1.0))
    with pytest.raises(BudgetExhausted):
        ledger.record("phase_a", GaussianRelease(0.5, 1.0))
    assert [json.loads(line)["kind"] for line in lines(ledger.path)] == ["open", "refusal", "refusal"]
    with pytest.raises(UnknownPhase):  # a misconfigured phase is an error, not a refusal
        ledger.check("phase_z", GaussianRelease(20.0, 1.0))
    assert len(lines(ledger.path)) == 3


def test_absurdly_small_noise_is_refused_without_building_its_pld(site):
    # dp-accounting would need petabytes for the PLD of noise multiplier 1e-6; RDP alone refuses it.
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    spy = NoiseSpy()
    with pytest.raises(BudgetExhausted, match="RDP epsilon to 5.5e\\+11"):
        ledger.release("phase_a", GaussianRelease(1e-6, 1.0), spy)
    assert spy.calls == 0
    refusal = ledger.entries()[-1]
    assert refusal["kind"] == "refusal" and refusal["requested"]["epsilon"] is None
    assert refusal["requested"]["epsilon_rdp"] > 10 * BUDGET.epsilon_total
    assert verify_ledger(ledger.path).ok
    # and the calibration search never wanders into that range
    assert ledger.calibrate("phase_a", lambda s: [GaussianRelease(s, 1.0)] * 10) > 1


def test_failed_noise_draw_records_nothing(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)

    def broken():
        raise RuntimeError("RNG failure")

    with pytest.raises(RuntimeError):
        ledger.release("phase_a", GaussianRelease(10.0, 1.0), broken)
    assert len(lines(ledger.path)) == 1 and ledger.spent() == (0.0, 0.0)


def test_privacy_units_have_separate_budgets(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    ledger.record("phase_a", GaussianRelease(3.0, 1.0, privacy_unit="site"))
    assert ledger.spent() == (0.0, 0.0)
    assert ledger.spent("site").pld > 0
    assert ledger.remaining("site", "phase_a") < ledger.remaining(phase="phase_a") == 2.0


def test_budget_persists_across_restarts_and_cannot_change(site):
    first = SiteLedger(site, "hospital-a", BUDGET, settings=FAST, run_id="run-1")
    sigma = first.calibrate("phase_a", lambda s: [GaussianRelease(s, 1.0)] * 3)
    for round_ in range(2):
        first.record("phase_a", GaussianRelease(sigma, 1.0), round=round_)
    spent = first.spent()

    second = SiteLedger(site, "hospital-a", BUDGET, run_id="run-2")  # settings come from the ledger
    assert second.spent() == spent
    second.record("phase_a", GaussianRelease(sigma, 1.0), round=2)  # the third planned release fits
    with pytest.raises(BudgetExhausted):  # a fourth does not, even in a new run
        second.record("phase_a", GaussianRelease(sigma, 1.0), round=3)
    assert [e["run_id"] for e in second.entries()[1:]] == ["run-1", "run-1", "run-2", "run-2"]

    with pytest.raises(LedgerConfigMismatch, match="budget"):
        SiteLedger(site, "hospital-a", BudgetConfig(20.0, DELTA, BUDGET.shares))
    with pytest.raises(LedgerConfigMismatch, match="accountant settings"):
        SiteLedger(site, "hospital-a", BUDGET, settings=AccountantSettings())
    with pytest.raises(LedgerConfigMismatch, match="belongs to site"):
        SiteLedger(site, "hospital-b", BUDGET)
    assert SiteLedger(site, "hospital-a").budget == BUDGET  # readers may omit the budget


def test_ledger_objects_sharing_a_site_see_each_others_entries(site):
    one = SiteLedger(site, "hospital-a", BUDGET)
    two = SiteLedger(site, "hospital-a", BUDGET)
    one.record("phase_a", GaussianRelease(4.0, 1.0))
    assert two.spent() == one.spent()
    entry = two.record("phase_a", GaussianRelease(4.0, 1.0))
    assert entry["seq"] == 2 and one.spent() == two.spent()
    assert verify_ledger(one.path).ok


def test_calibrated_plan_fits_every_round_and_no_more(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET, settings=FAST)
    plan = lambda s: [DpSgd(s, 0.05, 5, 1.0)] * 3  # noqa: E731
    sigma = ledger.calibrate("phase_a", plan)
    assert not ledger.price("phase_a", plan(sigma * 0.99), rdp=False).fits  # close to the smallest that fits
    for round_ in range(3):
        ledger.record("phase_a", DpSgd(sigma, 0.05, 5, 1.0), round=round_)
    assert ledger.spent(phase="phase_a").pld <= BUDGET.phase_cap("phase_a")
    with pytest.raises(BudgetExhausted):
        ledger.record("phase_a", DpSgd(sigma, 0.05, 5, 1.0), round=3)


def test_crash_mid_write_is_detected_on_reload_and_only_recovered_on_request(site, monkeypatch):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    ledger.record("phase_a", GaussianRelease(5.0, 1.0), round=0)
    spent = ledger.spent()

    def crash_halfway(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise SystemExit("simulated power loss")

    monkeypatch.setattr(atomic, "_write_all", crash_halfway)
    with pytest.raises(SystemExit):
        ledger.record("phase_a", GaussianRelease(5.0, 1.0), round=1)
    monkeypatch.undo()
    torn = ledger.path.read_bytes()
    assert not torn.endswith(b"\n")

    with pytest.raises(LedgerTornTail, match=r"line 3: incomplete last line") as caught:
        SiteLedger(site, "hospital-a", BUDGET)
    assert "recover_torn_tail=True" in str(caught.value)
    assert ledger.path.read_bytes() == torn, "detection must not repair or drop anything"
    replay = verify_ledger(ledger.path)
    assert [p.line for p in replay.problems] == [3] and "interrupted" in replay.problems[0].message

    recovered = SiteLedger(site, "hospital-a", BUDGET, recover_torn_tail=True)
    assert recovered.spent() == spent  # the torn release was never committed (nor sent)
    entries = recovered.entries()
    assert entries[-1]["kind"] == "recovery" and entries[-1]["seq"] == 2
    side_file = ledger.path.with_name(entries[-1]["torn_saved_as"])
    assert side_file.read_bytes() == torn[len(torn.rsplit(b"\n", 1)[0]) + 1:]
    assert verify_ledger(ledger.path, load_public_key(ledger.public_key_path)).ok
    recovered.record("phase_a", GaussianRelease(5.0, 1.0), round=1)
    assert verify_ledger(ledger.path).ok


def test_complete_last_line_without_newline_still_counts_as_torn(site):
    ledger = SiteLedger(site, "hospital-a", BUDGET)
    ledger.record("phase_a", GaussianRelease(5.0, 1.0))
    ledger.path.write_bytes(ledger.path.read_bytes()[:-1])
    with pytest.raises(LedgerTornTail):
        SiteLedger(site, "hospital-a", BUDGET)


def test_corrupted_ledger_refuses_to_open(small_ledger):
    path = small_ledger.path
    data = bytearray(path.read_bytes())
    data[data.index(b'"round":1') + 8] = ord("7")
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupted, match=r"entry 2 \(line 3\): signature"):
        SiteLedger(path.parent.parent, "site-1")


def _first_problem_line(path: Path, key) -> int:
    replay = verify_ledger(path, key, stop_at_first=True)
    assert replay.problems, "tampering went unnoticed"
    return replay.problems[0].line


def test_changing_a_byte_anywhere_fails_verification_at_that_entry(small_ledger):
    path, key = small_ledger.path, load_public_key(small_ledger.public_key_path)
    original = lines(path)
    assert verify_ledger(path, key).ok
    for index, line in enumerate(original):
        text = line.decode()
        # structural and value bytes: first/last, a key name, a digit, inside hash and signature
        positions = {0, len(line) - 1, text.index('"seq"') + 2, text.index('"prev_hash"') + 20,
                     text.index('"signature"') + 30}
        if '"epsilon":' in text:
            positions.add(text.index('"epsilon":') + 12)
        for position in sorted(positions):
            tampered = bytearray(line)
            tampered[position] = ord("5") if tampered[position] != ord("5") else ord("6")
            write_lines(path, original[:index] + [bytes(tampered)] + original[index + 1:])
            assert _first_problem_line(path, key) == index + 1, (index, position)
    write_lines(path, original)
    assert verify_ledger(path, key).ok


def test_reordering_deleting_and_foreign_signatures_are_named(small_ledger):
    path, key = small_ledger.path, load_public_key(small_ledger.public_key_path)
    original = lines(path)

    write_lines(path, original[:2] + [original[3], original[2]] + original[4:])
    problems = verify_ledger(path, key).problems
    assert problems[0].line == 3 and "sequence number is 3, expected 2" in problems[0].message

    write_lines(path, original[:2] + original[3:])
    problems = verify_ledger(path, key).problems
    assert problems[0].line == 3 and "expected 2" in problems[0].message
    assert any("prev_hash" in p.message for p in problems)

    other = Ed25519PrivateKey.generate()
    forged = resign(json.loads(original[2]), other)
    write_lines(path, original[:2] + [forged] + original[3:])
    problems = verify_ledger(path, key).problems
    assert str(problems[0]).startswith("entry 2 (line 3): signature does not verify")

    # A whole ledger re-signed (and re-chained) with another key fails at its open entry.
    rebuilt, prev = [], None
    for line in original:
        entry = json.loads(line)
        if entry["kind"] == "open":
            entry["public_key"] = public_key_b64(other.public_key())
            entry["key_fingerprint"] = key_fingerprint(other.public_key())
        rebuilt.append(resign(entry, other, prev))
        prev = line_hash(rebuilt[-1])
    write_lines(path, rebuilt)
    problems = verify_ledger(path, key).problems
    assert problems[0].line == 1 and "not the trusted site key" in problems[0].message
    assert verify_ledger(path).ok  # only internally consistent: why a trusted key is required


def test_a_key_holder_cannot_understate_or_misstate_epsilon(small_ledger):
    """Even entries correctly signed by the site key are re-priced from their mechanism."""
    path = small_ledger.path
    key = load_or_create_private_key(small_ledger.key_path)
    original = [json.loads(line) for line in lines(path)]

    def rewrite(index, change):
        out, prev = [], None
        for i, entry in enumerate(original):
            entry = copy.deepcopy(entry)
            if i == index:
                change(entry)
            out.append(resign(entry, key, prev))
            prev = line_hash(out[-1])
        write_lines(path, out)
        return verify_ledger(path, key.public_key()).problems

    problems = rewrite(2, lambda e: e.update(epsilon=0.01))
    assert problems[0].line == 3 and "re-computing gives" in problems[0].message
    assert any("decreased" in p.message for p in problems)  # entry 3 would then appear to jump back
    problems = rewrite(2, lambda e: e["mechanism"].update(noise_multiplier=50.0))
    assert problems[0].line == 3 and "epsilon is" in problems[0].message
    problems = rewrite(3, lambda e: e.update(kind="release"))  # a refusal passed off as a release
    assert problems[0].line == 4


def test_coordinator_countersigns_verified_entries_only(tmp_path, small_ledger):
    coordinator = CoordinatorLedgerCopy(tmp_path / "coordinator")
    assert stat.S_IMODE((tmp_path / "coordinator/keys/coordinator_ed25519.key").stat().st_mode) == 0o600
    entries = small_ledger.entries()
    releases = [e for e in entries if e["kind"] == "release"]

    with pytest.raises(CopyRejected, match="open entry"):
        coordinator.accept("site-1", releases[:1])
    records = coordinator.accept("site-1", [entries[0], releases[0]])
    assert [r["site_entry"]["seq"] for r in records] == [0, 1]
    coordinator.accept("site-1", releases[1:3])  # refusal not shipped: gaps are fine
    with pytest.raises(CopyRejected, match="does not follow"):
        coordinator.accept("site-1", releases[1:2])  # a replay of an old entry
    altered = dict(releases[3], epsilon=releases[3]["epsilon"] + 1)
    with pytest.raises(CopyRejected, match="signature"):
        coordinator.accept("site-1", [altered])
    with pytest.raises(CopyRejected, match="from site"):
        coordinator.accept("site-2", [entries[0]])
    coordinator.accept("site-1", releases[3:])

    copy_path = coordinator.copy_path("site-1")
    replay, problems, _ = read_copy(copy_path, coordinator.public_key, coordinator.site_key("site-1"))
    assert problems == [] and len(replay.entries) == 5
    assert replay.state.spent("site") == small_ledger.spent("site")

    # A fresh coordinator process continues the same copy; an edited copy is caught.
    CoordinatorLedgerCopy(tmp_path / "coordinator")  # same key, nothing rewritten
    copy_lines = lines(copy_path)
    record = json.loads(copy_lines[1])
    record["received_at"] = "2000-01-01T00:00:00.000000Z"
    write_lines(copy_path, [copy_lines[0], canonical_json(record)] + copy_lines[2:])
    _, problems, _ = read_copy(copy_path, coordinator.public_key, coordinator.site_key("site-1"))
    assert problems[0].line == 2 and "countersignature" in problems[0].message
