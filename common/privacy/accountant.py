"""Composition of a site's releases with Google's dp-accounting, and noise calibration.

The reported epsilon comes from the PLD accountant (tight); the RDP accountant runs alongside
as a familiar, more conservative second opinion. All privacy math is dp-accounting's: this
module only feeds it events and searches over noise multipliers.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pmlm.common.privacy.events import NEIGHBOURING_RELATIONS, DpSgd, GaussianRelease, Mechanism, MechanismError

DP_ACCOUNTING_VERSION = importlib.metadata.version("dp-accounting")
ACCOUNTANT = f"dp-accounting {DP_ACCOUNTING_VERSION}"


@dataclass(frozen=True)
class AccountantSettings:
    """How the PLD accountant discretises; stored with a ledger so verification re-prices identically.

    1e-3 instead of the library's 1e-4: measured here, ten times faster per composition
    (0.05 s vs 0.5 s for 1000 DP-SGD steps) and about 0.001 larger epsilon at epsilon 1.5
    (the discretisation is pessimistic, so the bound stays valid).
    """

    pld_value_discretization_interval: float = 1e-3

    def __post_init__(self) -> None:
        interval = self.pld_value_discretization_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= 0.1:
            raise ValueError(f"pld_value_discretization_interval must be in (0, 0.1], got {interval!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"pld_value_discretization_interval": self.pld_value_discretization_interval}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AccountantSettings":
        return cls(pld_value_discretization_interval=data["pld_value_discretization_interval"])


class Epsilons(NamedTuple):
    pld: float
    rdp: float


class Composition:
    """Everything one privacy unit has released so far, composed by both accountants.

    with_rdp=False keeps only the PLD accountant (RDP epsilon reads NaN): per-phase caps are
    checked on PLD, and RDP of a Poisson-subsampled Gaussian costs more than PLD to compose.
    """

    def __init__(self, settings: AccountantSettings | None = None, neighbouring: str = "add-remove-one",
                 *, with_rdp: bool = True):
        if neighbouring not in NEIGHBOURING_RELATIONS:
            raise MechanismError(f"unsupported neighbouring relation {neighbouring!r}")
        self.settings = settings or AccountantSettings()
        self.neighbouring = neighbouring
        relation = NEIGHBOURING_RELATIONS[neighbouring]
        self._pld = PLDAccountant(relation, value_discretization_interval=self.settings.pld_value_discretization_interval)
        self._rdp = RdpAccountant(neighboring_relation=relation) if with_rdp else None
        self.releases = 0
        self.pld_skipped = False
        # What was composed, in order (runs merged only where the caller merged them): with the settings and the
        # relation it determines both accountants' state, so equal histories price equally (BudgetState.price_key).
        self.history: tuple[Mechanism, ...] = ()

    def add(self, mechanism: Mechanism) -> None:
        self._check(mechanism)
        event = mechanism.to_dp_event()
        self._pld.compose(event)
        if self._rdp is not None:
            self._rdp.compose(event)
        self.releases += 1
        self.history += (mechanism,)

    def _check(self, mechanism: Mechanism) -> None:
        if mechanism.neighbouring != self.neighbouring:
            raise MechanismError(
                f"cannot compose a {mechanism.neighbouring} mechanism into a {self.neighbouring} composition"
            )

    def with_added(
        self,
        mechanisms: Union[Mechanism, Iterable[Mechanism]],
        *,
        rdp: bool = True,
        rdp_screen: tuple[float, float] | None = None,
    ) -> "Composition":
        """A copy with `mechanisms` composed in; this composition is left unchanged.

        rdp=False drops the RDP accountant from the copy (calibration searches on PLD alone).
        rdp_screen=(delta, limit): compose RDP first; if the copy's RDP epsilon at delta exceeds
        limit, build no PLD: the copy's `pld_skipped` is set and its PLD epsilon reads infinite.
        """
        mechanisms = [mechanisms] if isinstance(mechanisms, (DpSgd, GaussianRelease)) else list(mechanisms)
        for mechanism in mechanisms:
            self._check(mechanism)
        trial = copy.deepcopy(self)
        if not rdp:
            trial._rdp = None
        trial.history = self.history + tuple(mechanisms)
        events = [m.to_dp_event() for m in mechanisms]
        if trial._rdp is not None:
            for event in events:
                trial._rdp.compose(event)
            if rdp_screen is not None and trial._rdp.get_epsilon(rdp_screen[0]) > rdp_screen[1]:
                trial._pld, trial.pld_skipped = None, True
                trial.releases += len(events)
                return trial
        for event in events:
            trial._pld.compose(event)
        trial.releases += len(events)
        return trial

    def without_rdp(self) -> "Composition":
        """A PLD-only copy (what a phase composition is), for a phase whose history is the unit's whole history."""
        trial = copy.deepcopy(self)
        trial._rdp = None
        return trial

    def epsilon(self, delta: float) -> Epsilons:
        if self.releases == 0:
            return Epsilons(0.0, 0.0 if self._rdp is not None else math.nan)
        rdp = float(self._rdp.get_epsilon(delta)) if self._rdp is not None else math.nan
        return Epsilons(math.inf if self.pld_skipped else float(self._pld.get_epsilon(delta)), rdp)


def compose_epsilon(mechanisms: Sequence[Mechanism], delta: float, settings: AccountantSettings | None = None) -> Epsilons:
    """Epsilon at `delta` of all `mechanisms` composed (they must share one privacy unit)."""
    units = {m.privacy_unit for m in mechanisms}
    if len(units) > 1:
        raise MechanismError(f"mechanisms of different privacy units {sorted(units)} are separate guarantees")
    return Composition(settings).with_added(mechanisms).epsilon(delta)


def merge_repeats(mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """Runs of identical mechanisms as one with that many times the steps/releases (the same mechanism)."""
    runs: list[list] = []
    for mechanism in mechanisms:
        if runs and runs[-1][0] == mechanism:
            runs[-1][1] += 1
        else:
            runs.append([mechanism, 1])
    return [m if times == 1 else m.repeated(times) for m, times in runs]


# The RDP orders of the pre-filter (budget.py), which only needs an upper bound: integer orders have a closed form,
# while dp-accounting's fractional ones (1.1-10.9) took 0.1 s a composition, most of a site's first calibration (and
# those below 2 do not converge at a sampling rate of 0.5). Measured: 0.015 s, and epsilon 0.2% higher at 1.66.
SCREEN_ORDERS = (*range(2, 64), 128, 256, 512, 1024)


@functools.lru_cache(maxsize=512)
def rdp_epsilon_alone(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    """RDP epsilon of `mechanisms` composed on their own, at SCREEN_ORDERS; cached, as every round repeats the same
    one. Never lower than the epsilon at the default orders for the same events (fewer orders to minimise over)."""
    accountant = RdpAccountant(SCREEN_ORDERS)
    for mechanism in mechanisms:
        accountant.compose(mechanism.to_dp_event())
    return float(accountant.get_epsilon(delta))


class CalibrationError(ValueError):
    """No noise multiplier in the searched range meets the target."""


# Where the search starts: near the multipliers of this product's budgets (DP-SGD at a few epsilon needs about 4), and
# high rather than low, as a PLD's cost grows as the noise shrinks (0.4 s at 1 against 0.09 s at 4, in a ledger).
FIRST_GUESS = 4.0


def smallest_noise_multiplier(slack: Callable[[float], float], tolerance: float = 1e-3,
                              near: float | None = None) -> float:
    """The smallest noise multiplier (within a relative `tolerance`) whose `slack` is >= 0.

    `slack(s)` is what is left of the target once the releases at noise multiplier s are made (target minus
    epsilon; -inf where s cannot be priced at all). It must not fall as s grows. The answer always has slack
    >= 0; it is at most (1 + tolerance) times the true minimum, except for targets so loose that 1/8 already
    fits (epsilon in the tens for one Gaussian release), where 1/8 is returned: PLDs of tinier multipliers
    take seconds to build and buy nothing useful.

    Each call of `slack` composes a PLD (~0.1 s), and a site calibrates before its first release of every
    phase, so the search uses the values, not only their signs: epsilon falls roughly as 1/s, so slack is
    nearly linear in 1/s. A secant guess from the last two values, tried just above the estimated root (then
    just under the bracket's top), usually closes the bracket in two or three calls where halving it took ten;
    after three calls in a row on the same side of the root, the bracket is halved instead.

    `near`: where the answer is expected (the coordinator's estimate for the plan, common/phase_a.py), checked in
    two calls, at it and just under it; if they do not close the bracket, the search goes on from there. Only the
    number of calls depends on it, never the answer; values outside [1/8, 1024], or not numbers, are not used.
    """
    high = FIRST_GUESS
    if isinstance(near, (int, float)) and math.isfinite(near) and 1 / 8 <= near <= 1024:  # it comes off the wire
        high = near
    high_slack = slack(high)
    low, low_slack = 0.0, -math.inf
    if high == near and high_slack >= 0:
        under = near * (1 - 0.99 * tolerance)
        under_slack = slack(under)
        if under_slack < 0:
            return high
        # both fit: a secant through them (extrapolated down) before any halving
        high, high_slack, before, last = under, under_slack, (near, high_slack), (under, under_slack)
        if math.isfinite(high_slack) and high_slack != before[1]:
            return _bracketed(slack, tolerance, low, high, before, last)
    while high_slack < 0:
        low, low_slack = high, high_slack
        high *= 2
        if high > 2**20:
            raise CalibrationError("no noise multiplier up to 2^20 meets the target; is the budget already spent?")
        high_slack = slack(high)
    before, last = (low, low_slack), (high, high_slack)
    if low == 0.0:  # the first guess fits: halve down to the first that does not
        while True:
            low, low_slack = high / 2, slack(high / 2)
            before, last = (high, high_slack), (low, low_slack)
            if low_slack < 0:
                break
            high, high_slack = low, low_slack
            if high <= 1 / 8:
                return high
    return _bracketed(slack, tolerance, low, high, before, last)


def _bracketed(slack, tolerance, low, high, before, last) -> float:
    """smallest_noise_multiplier's closing: the root lies in (low, high] (high fits; low does not, or is 0), and
    `before`, `last` are the last two (multiplier, slack) values seen."""
    streak = 0  # guesses in a row on the same side of the root (a secant creeping in from one side)
    while high - low > tolerance * high:
        if low == 0.0 and high <= 1 / 8:  # nothing failed yet: as loose a target as the halving's floor
            return high
        width = high - low
        guess = (low + high) / 2
        if streak < 3 and math.isfinite(last[1]) and math.isfinite(before[1]) and last[1] != before[1]:
            # the secant through the last two values in 1/s (near linear there), kept inside the bracket
            (s1, v1), (s2, v2) = before, last
            inverse = 1 / s2 + (1 / s1 - 1 / s2) * v2 / (v2 - v1)
            root = 1 / inverse if inverse > 0 else high
            # just above the root, but never above just under the top, where one call that fails closes the bracket
            guess = max(min(root * (1 + tolerance / 2), high * (1 - 0.99 * tolerance)), low + 0.01 * width)
        value = slack(guess)
        streak = streak + 1 if (value >= 0) == (last[1] >= 0) else 1
        before, last = last, (guess, value)
        if value >= 0:
            high = guess
        else:
            low = guess
    return high


def calibrate_dpsgd(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    settings: AccountantSettings | None = None,
    tolerance: float = 1e-3,
) -> float:
    """Noise multiplier for `steps` DP-SGD steps at `sampling_rate` to spend at most `target_epsilon` (PLD)."""
    if target_epsilon <= 0:
        raise CalibrationError(f"target_epsilon must be > 0, got {target_epsilon}")

    def slack(sigma: float) -> float:
        mech = DpSgd(sigma, sampling_rate, steps, clipping_norm=1.0)
        return target_epsilon - Composition(settings, with_rdp=False).with_added(mech).epsilon(delta).pld

    return smallest_noise_multiplier(slack, tolerance)


def calibrate_gaussian(
    target_epsilon: float,
    delta: float,
    releases: int = 1,
    *,
    settings: AccountantSettings | None = None,
    tolerance: float = 1e-3,
) -> float:
    """Noise multiplier (std / L2 sensitivity) for `releases` Gaussian releases within `target_epsilon` (PLD)."""
    if target_epsilon <= 0:
        raise CalibrationError(f"target_epsilon must be > 0, got {target_epsilon}")
    return _calibrated_gaussian(float(target_epsilon), float(delta), int(releases), settings, float(tolerance))


# A pure function of its arguments, and a dear one (about 15 PLD builds, 0.5 s): every message a site answers derives
# its phase caps from it (client/site_policy.py), so a ten-site in-process run spent 160 of its 400 s here.
@functools.lru_cache(maxsize=1024)
def _calibrated_gaussian(target_epsilon: float, delta: float, releases: int, settings: AccountantSettings | None,
                         tolerance: float) -> float:
    def slack(sigma: float) -> float:
        mech = GaussianRelease(sigma, l2_sensitivity=1.0, releases=releases)
        return target_epsilon - Composition(settings, with_rdp=False).with_added(mech).epsilon(delta).pld

    return smallest_noise_multiplier(slack, tolerance)


def describe_spent(epsilon: float, budget: float | None = None, rdp: float | None = None, *,
                   delta: float | None = None, digits: int = 4) -> str:
    """ε as people should read it: the enforced PLD figure first, against the budget; the RDP figure only as the
    labelled looser bound (it can lie above the budget with nothing overspent, so it is never shown bare).

    >>> describe_spent(2.958, 3.0, 3.214)
    'ε=2.958 of budget 3 (PLD, enforced; RDP bound, looser, not enforced: 3.214)'
    """
    text = f"ε={epsilon:.{digits}g}"
    if budget is not None:
        text += f" of budget {budget:g}"
    if delta is not None:
        text += f" at δ={delta:g}"
    if rdp is not None and math.isfinite(rdp):
        return text + f" (PLD, enforced; RDP bound, looser, not enforced: {rdp:.{digits}g})"
    return text + " (PLD, enforced)"
