"""Mechanisms as data, composition against dp-accounting used directly, calibration, budgets."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pmlm.common.privacy import (
    AccountantSettings,
    BudgetConfig,
    DpSgd,
    GaussianRelease,
    MechanismError,
    UnknownPhase,
    calibrate_dpsgd,
    calibrate_gaussian,
    compose_epsilon,
    mechanism_from_dict,
)
from pmlm.common.privacy.budget import BudgetState, composed_caps

DELTA = 1e-5
INTERVAL = AccountantSettings().pld_value_discretization_interval


def direct(events: list, delta: float = DELTA) -> tuple[float, float]:
    """Epsilon of `events` composed straight through dp-accounting, without any PMLM code."""
    pld = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=INTERVAL)
    rdp = RdpAccountant()
    composed = dp_accounting.ComposedDpEvent(events)
    pld.compose(composed)
    rdp.compose(composed)
    return pld.get_epsilon(delta), rdp.get_epsilon(delta)


def sgd_event(sigma: float, q: float, steps: int):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def test_dpsgd_composition_matches_dp_accounting_directly():
    mechanisms = [DpSgd(1.3, 0.05, 20, 1.0), DpSgd(1.3, 0.05, 20, 1.0), DpSgd(2.0, 0.02, 30, 0.5)]
    got = compose_epsilon(mechanisms, DELTA)
    pld, rdp = direct([sgd_event(1.3, 0.05, 20), sgd_event(1.3, 0.05, 20), sgd_event(2.0, 0.02, 30)])
    assert got.pld == pytest.approx(pld, rel=1e-9)
    assert got.rdp == pytest.approx(rdp, rel=1e-9)
    assert 0 < got.pld < got.rdp  # PLD is the tighter of the two here


def test_gaussian_and_mixed_composition_match_dp_accounting_directly():
    mechanisms = [GaussianRelease(4.0, 2.0, releases=3), DpSgd(1.5, 0.05, 10, 1.0), GaussianRelease(6.0, 1.0)]
    got = compose_epsilon(mechanisms, DELTA)
    pld, rdp = direct([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 3),
        sgd_event(1.5, 0.05, 10),
        dp_accounting.GaussianDpEvent(6.0),
    ])
    assert got.pld == pytest.approx(pld, rel=1e-9)
    assert got.rdp == pytest.approx(rdp, rel=1e-9)
    # the sensitivity scales the noise, not the privacy: sigma is already relative to it
    assert GaussianRelease(4.0, 2.0).noise_stddev == 8.0


def test_empty_composition_costs_nothing():
    assert tuple(compose_epsilon([], DELTA)) == (0.0, 0.0)


def test_units_are_never_composed_together():
    with pytest.raises(MechanismError, match="separate guarantees"):
        compose_epsilon([GaussianRelease(3.0, 1.0), GaussianRelease(3.0, 1.0, privacy_unit="site")], DELTA)


@pytest.mark.parametrize("mechanism", [
    DpSgd(1.1, 0.01, 1000, 1.0),
    DpSgd(0.9, 1.0, 3, 2.5, privacy_unit="site"),
    GaussianRelease(2.0, 0.5, releases=4),
])
def test_mechanism_round_trips_through_json(mechanism):
    data = json.loads(json.dumps(mechanism.to_dict()))
    assert data["type"] == mechanism.kind
    assert mechanism_from_dict(data) == mechanism
    assert type(mechanism).from_dict(data) == mechanism


@pytest.mark.parametrize("build, message", [
    (lambda: DpSgd(0.0, 0.01, 10, 1.0), "noise_multiplier"),
    (lambda: DpSgd(float("nan"), 0.01, 10, 1.0), "noise_multiplier"),
    (lambda: DpSgd(1.0, 1.5, 10, 1.0), "sampling_rate"),
    (lambda: DpSgd(1.0, 0.01, 0, 1.0), "steps"),
    (lambda: DpSgd(1.0, 0.01, 10.5, 1.0), "steps"),
    (lambda: DpSgd(1.0, 0.01, 10, -1.0), "clipping_norm"),
    (lambda: GaussianRelease(1.0, 0.0), "l2_sensitivity"),
    (lambda: GaussianRelease(1.0, 1.0, privacy_unit="patient"), "privacy_unit"),
    (lambda: GaussianRelease(1.0, 1.0, neighbouring="replace-one"), "neighbouring"),
    (lambda: mechanism_from_dict({"type": "laplace", "scale": 1}), "unknown mechanism type"),
    (lambda: mechanism_from_dict({**GaussianRelease(1.0, 1.0).to_dict(), "bonus": 1}), "unexpected fields"),
    (lambda: mechanism_from_dict({"type": "gaussian", "noise_multiplier": 1.0}), "l2_sensitivity"),
])
def test_invalid_mechanisms_are_rejected(build, message):
    with pytest.raises(MechanismError, match=message):
        build()


def test_calibrate_dpsgd_is_the_smallest_noise_within_target():
    target, q, steps = 1.0, 0.05, 20
    sigma = calibrate_dpsgd(target, DELTA, q, steps, tolerance=1e-3)
    eps_at, _ = direct([sgd_event(sigma, q, steps)])
    eps_below, _ = direct([sgd_event(sigma * (1 - 3e-3), q, steps)])
    assert eps_at <= target < eps_below


def test_calibrate_gaussian_is_the_smallest_noise_within_target():
    target, releases = 0.8, 5
    sigma = calibrate_gaussian(target, DELTA, releases, tolerance=1e-3)
    event = lambda s: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s), releases)  # noqa: E731
    assert direct([event(sigma)])[0] <= target < direct([event(sigma * (1 - 3e-3))])[0]


def test_noise_search_finds_the_smallest_fitting_multiplier_in_a_few_calls():
    """Slack shaped like epsilon's (falling as a power of 1/s, with the PLD's discretisation jitter on top): the
    answer always fits, is within the tolerance of the smallest that does, and costs far fewer calls than halving
    the bracket (12 to 14 for these targets)."""
    from pmlm.common.privacy.accountant import smallest_noise_multiplier

    for power in (0.5, 1.0, 2.0):
        for root in (2.3, 5.1, 11.7):  # 2 or 3 calls to bracket, from the first guess of 4
            target, calls = 5.94 / root**power, []

            def slack(s):
                calls.append(s)
                return target - 5.94 / s**power + 2e-4 * math.sin(1e4 * s)  # jitter at the discretisation's scale

            sigma = smallest_noise_multiplier(slack, 1e-3)
            assert slack(sigma) >= 0 and slack(sigma / 1.001) < 0, (power, target, sigma)
            assert len(calls) - 2 <= 10, (power, root, len(calls) - 2)


def test_noise_search_still_halves_where_values_do_not_help():
    """A slack that only says yes or no (a step), one that cannot be priced below a point (-inf), and one that
    jumps: the answer still fits and is within the tolerance."""
    from pmlm.common.privacy.accountant import smallest_noise_multiplier

    cases = {"step": lambda s: 1.0 if s >= 3.3 else -1.0,
             "unpriced below": lambda s: 2.0 - 6.0 / s if s >= 2.5 else -math.inf,
             "jump": lambda s: 0.01 if s >= 7.77 else -5.0 / s}
    for name, slack in cases.items():
        sigma = smallest_noise_multiplier(slack, 1e-3)
        assert slack(sigma) >= 0 and slack(sigma / 1.001) < 0, (name, sigma)


def test_composed_caps_compose_to_the_total_where_split_epsilons_left_a_third_unspent():
    caps = composed_caps(3.0, DELTA, {"phase_a": 1.5}, ("phase_b", "phase_c"))
    assert caps["phase_a"] == 1.5 and caps["phase_b"] == caps["phase_c"] > 1.5
    # Priced straight through dp-accounting: one Gaussian release a phase at its cap composes to the total.
    sigmas = [calibrate_gaussian(cap, DELTA, tolerance=1e-4) for cap in caps.values()]
    assert direct([dp_accounting.GaussianDpEvent(s) for s in sigmas])[0] == pytest.approx(3.0, abs=0.02)
    # The split it replaces, 1.5 + 0.75 + 0.75, composes to far less.
    old = [calibrate_gaussian(cap, DELTA) for cap in (1.5, 0.75, 0.75)]
    assert direct([dp_accounting.GaussianDpEvent(s) for s in old])[0] < 2.2
    with pytest.raises(ValueError, match="whole budget"):
        composed_caps(3.0, DELTA, {"phase_a": 3.0}, ("phase_b",))


def test_phases_calibrated_on_composed_caps_spend_the_budget_and_never_more(tmp_path):
    """Phase A's DP-SGD, phase B's three Gaussian releases and phase C's one, each calibrated by the ledger
    on the pipeline's budget: together they spend nearly all of it, never more, with less noise in B and C."""
    from pmlm.client.site_policy import SitePolicy
    from pmlm.common.privacy import SiteLedger

    def run(budget, name):
        ledger = SiteLedger(tmp_path / name, name, budget)
        a = ledger.calibrate("phase_a", lambda s: [DpSgd(s, 1 / 3, 3, 0.3)] * 3)
        for r in range(3):
            ledger.record("phase_a", DpSgd(a, 1 / 3, 3, 0.3), round=r + 1)
        b = ledger.calibrate("phase_b", lambda s: [GaussianRelease(s, 1.0, releases=3)])
        ledger.record("phase_b", GaussianRelease(b, 1.0, releases=3), round=1)
        c = ledger.calibrate("phase_c", lambda s: [GaussianRelease(s, 1.0)])
        ledger.record("phase_c", GaussianRelease(c, 1.0), round=1)
        return ledger.spent().pld, b, c

    spent, b, c = run(SitePolicy(epsilon_total=3.0, delta=DELTA).budget(), "composed")
    split = BudgetConfig(3.0, DELTA, {"phase_a": 0.5, "phase_b": 0.25, "phase_c": 0.25})
    spent_split, b_split, c_split = run(split, "split")
    assert 2.85 < spent <= 3.0 and spent_split < 2.0
    assert b < b_split / 1.8 and c < c_split / 1.8


def test_a_phase_priced_from_the_units_composition_matches_dp_accounting_on_its_own_releases():
    """While the unit's releases are all one phase's, the phase's PLD is taken from the unit's composition instead of
    being composed again; once another phase has released, each phase composes only its own."""
    state = BudgetState(BudgetConfig(8.0, DELTA, {"phase_a": 0.5, "phase_b": 0.5}), AccountantSettings())
    first, second = DpSgd(2.0, 0.5, 4, 1.0), DpSgd(2.5, 0.5, 4, 1.0)
    for charge in (state.price("phase_a", first), state.price("phase_a", first, rdp=False)):
        assert charge.phase_after.pld == pytest.approx(direct([sgd_event(2.0, 0.5, 4)])[0], abs=1e-9)
        assert charge.phase_after.pld == charge.after.pld
    state.commit(state.price("phase_a", first))
    both = direct([sgd_event(2.0, 0.5, 4), sgd_event(2.5, 0.5, 4)])[0]
    assert state.price("phase_a", second).phase_after.pld == pytest.approx(both, abs=1e-9)
    other = state.price("phase_b", second)  # phase B has released nothing: its own PLD is the new release alone
    assert other.phase_after.pld == pytest.approx(direct([sgd_event(2.5, 0.5, 4)])[0], abs=1e-9)
    assert other.after.pld == pytest.approx(both, abs=1e-9)
    state.commit(other)
    assert state.price("phase_a", second).phase_after.pld == pytest.approx(both, abs=1e-9)  # A's own two, not B's
    assert state.spent().pld == pytest.approx(both, abs=1e-9) and math.isnan(state.spent(phase="phase_a").rdp)


def test_budget_config_validation_and_caps():
    budget = BudgetConfig(8.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.25, "phase_c": 0.25})
    assert budget.phase_cap("phase_b") == 2.0
    assert BudgetConfig.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget
    with pytest.raises(UnknownPhase, match="phase_x"):
        budget.phase_cap("phase_x")
    for bad in ({"epsilon_total": 0, "delta": 1e-5, "shares": {"a": 1}},
                {"epsilon_total": 1, "delta": 1.0, "shares": {"a": 1}},
                {"epsilon_total": 1, "delta": 1e-5, "shares": {}},
                {"epsilon_total": 1, "delta": 1e-5, "shares": {"a": 1.5}}):
        with pytest.raises(ValueError):
            BudgetConfig(**bad)


def test_budget_state_enforces_phase_share_and_total():
    # Overlapping shares (1.0 + 1.0): each phase may use it all, the total cap stops the second.
    state = BudgetState(BudgetConfig(1.0, DELTA, {"a": 1.0, "b": 1.0}), AccountantSettings())
    big = GaussianRelease(calibrate_gaussian(0.8, DELTA), 1.0)
    charge = state.price("a", big)
    assert charge.fits and charge.after.pld == pytest.approx(0.8, abs=0.01)
    state.commit(charge)
    second = state.price("b", big)
    assert second.phase_after.pld < 1.0 and second.after.pld > 1.0
    assert second.exceeded == "total" and not second.fits
    # a partitioned budget: the phase cap binds
    state = BudgetState(BudgetConfig(1.0, DELTA, {"a": 0.5, "b": 0.5}), AccountantSettings())
    assert state.price("a", big).exceeded == "phase"
    assert state.spent() == (0.0, 0.0)  # pricing never spends
    assert state.remaining(phase="a") == 0.5
    assert math.isnan(state.price("a", big, rdp=False).after.rdp)


def test_sites_with_the_same_budget_and_history_share_the_noise_search_and_each_confirms_its_own(tmp_path):
    """The second of two identical ledgers finds the same multiplier without a PLD build in the search: only the
    confirmation on its own state (see ledger._SEARCH_TRIALS)."""
    from pmlm.common.privacy import SiteLedger

    budget = BudgetConfig(3.0, DELTA, {"phase_a": 0.5, "phase_b": 0.5})
    plan = lambda s: [GaussianRelease(s, 1.0)] * 2  # noqa: E731
    first, second = (SiteLedger(tmp_path / name, name, budget) for name in ("site_1", "site_2"))
    for ledger in (first, second):
        ledger.record("phase_b", GaussianRelease(4.0, 1.0), round=1)  # the same history at both
    sigma_1 = first.calibrate("phase_a", plan)
    priced = []
    state = second._replay.state
    original = state.price
    state.price = lambda *a, **k: priced.append(k) or original(*a, **k)
    sigma_2 = second.calibrate("phase_a", plan)
    assert sigma_2 == sigma_1
    assert priced == [{"rdp": False, "screen": False}]  # the confirmation alone
    # A site whose history differs asks its own questions.
    third = SiteLedger(tmp_path / "site_3", "site_3", budget)
    third.record("phase_b", GaussianRelease(3.5, 1.0), round=1)
    priced.clear()
    state = third._replay.state
    original_third = state.price
    state.price = lambda *a, **k: priced.append(k) or original_third(*a, **k)
    third.calibrate("phase_a", plan)
    assert len(priced) > 3  # a search of its own (its total spent differs), then the confirmation


def test_a_wrong_search_memo_can_make_calibration_fail_but_never_overspend(tmp_path, monkeypatch):
    """The search's trials poisoned to say 'fits' for too little noise (a multiplier of 3.2, where epsilon 1 needs
    about 4.7): the multiplier found is still priced on the ledger's own state before it is returned, so the ledger
    returns one that fits, or refuses, never the poisoned one."""
    from pmlm.common.privacy import SiteLedger
    from pmlm.common.privacy import ledger as ledger_module
    from pmlm.common.privacy.accountant import CalibrationError

    class FitsFromThreePointTwo(dict):
        def __contains__(self, key):
            return True

        def __getitem__(self, key):
            return (1.0 if key[0][-1][0].noise_multiplier >= 3.2 else -1.0, True)

    honest = SiteLedger(tmp_path / "honest", "honest", BudgetConfig(1.0, DELTA, {"phase_a": 1.0}))
    needed = honest.calibrate("phase_a", lambda s: [GaussianRelease(s, 1.0)])
    assert needed > 3.5
    monkeypatch.setattr(ledger_module, "_SEARCH_TRIALS", FitsFromThreePointTwo())
    ledger = SiteLedger(tmp_path / "site", "site", BudgetConfig(1.0, DELTA, {"phase_a": 1.0}))
    try:
        sigma = ledger.calibrate("phase_a", lambda s: [GaussianRelease(s, 1.0)])
    except CalibrationError:
        return
    assert sigma >= needed / 1.001 and ledger.price("phase_a", GaussianRelease(sigma, 1.0)).fits


@pytest.mark.parametrize("mechanisms", [
    (DpSgd(3.0, 0.5, 4, 0.3),),  # phase A at the sample's rate
    (DpSgd(1.2, 0.05, 400, 1.0),),  # many steps at a low rate
    (GaussianRelease(4.0, 1.0), DpSgd(2.0, 0.3, 10, 1.0)),
    (GaussianRelease(1e-6, 1.0),),  # absurd: the screen's reason to exist
])
def test_the_pre_filters_rdp_never_reads_lower_than_dp_accountings_default_orders(mechanisms):
    """The screen (budget.py's RDP pre-filter) runs at integer orders for speed: it may only err towards refusing,
    so its epsilon is never below dp-accounting's at its default orders, and close to it where budgets live."""
    from pmlm.common.privacy.accountant import rdp_epsilon_alone

    screen = rdp_epsilon_alone(mechanisms, DELTA)
    default = RdpAccountant()
    for mechanism in mechanisms:
        default.compose(mechanism.to_dp_event())
    reference = default.get_epsilon(DELTA)
    assert screen >= reference
    if reference < 30:
        assert screen <= reference * 1.02


def test_the_coordinators_noise_estimate_changes_how_long_a_site_searches_never_what_it_finds(tmp_path, monkeypatch):
    """Phase A's coordinator sends where it expects each site's noise search to end (common/phase_a.py
    expected_noise_multiplier). A fresh site confirms a right estimate in two prices and the final check; a wrong,
    absurd or hostile one only costs searching: every answer fits and is the same multiplier within the tolerance."""
    from pmlm.common.phase_a import PhaseAConfig, expected_noise_multiplier, planned_releases
    from pmlm.common.privacy import SiteLedger
    from pmlm.common.privacy import ledger as ledger_module

    cfg = PhaseAConfig.from_run_config({"epsilon": 3.0, "num-server-rounds": 3, "local-epochs": 1})
    guess = expected_noise_multiplier(cfg)
    budget = BudgetConfig(3.0, DELTA, {"phase_a": 0.5, "phase_b": 0.5})
    plan = lambda s: planned_releases(cfg, s)  # noqa: E731

    def calibrate(name: str, near, spent: float | None = None) -> tuple[float, int, SiteLedger]:
        monkeypatch.setattr(ledger_module, "_SEARCH_TRIALS", {})  # no help from another site's search
        ledger = SiteLedger(tmp_path / name, name, budget)
        if spent is not None:
            ledger.record("phase_b", GaussianRelease(spent, 1.0), round=1)
        priced, state = [], ledger._replay.state
        original = state.price
        state.price = lambda *a, **k: priced.append(k) or original(*a, **k)
        return ledger.calibrate("phase_a", plan, phase_cap=cfg.phase_a_epsilon, near=near), len(priced), ledger

    alone, alone_prices, _ = calibrate("alone", None)
    told, told_prices, _ = calibrate("told", guess)
    assert told == pytest.approx(alone, rel=1e-3) and told == pytest.approx(guess, rel=1e-3)
    assert told_prices == 3 < alone_prices  # at the estimate, just under it, then the plan as it will be composed
    for i, near in enumerate([guess * 1.3, guess * 0.7, guess * 1.0005, 1e-9, 1e9, math.nan, math.inf, -4.0, "4"]):
        sigma, _, ledger = calibrate(f"wrong-{i}", near)
        assert sigma == pytest.approx(alone, rel=1.5e-3), near
        assert all(ledger.price("phase_a", m).fits for m in plan(sigma)[:1])
    # A site that has already spent some of its budget needs more noise than the fresh site's estimate, and finds it.
    budget = BudgetConfig(2.0, DELTA, {"phase_a": 0.75, "phase_b": 0.75})  # the total binds after phase B's release
    spent, _, _ = calibrate("spent", None, spent=2.6)
    told_spent, _, ledger = calibrate("spent-told", guess, spent=2.6)
    assert told_spent == pytest.approx(spent, rel=1.5e-3) and told_spent > guess * 1.01
