"""A site's privacy budget: the total epsilon at a fixed delta, split into per-phase shares.

Every privacy unit (patient-in-site, site) gets the whole budget as its own, separate
guarantee. Within a unit, a release must keep both the unit's composed epsilon under
`epsilon_total` and its phase's composed epsilon under `share * epsilon_total`. Limits are
checked on the PLD epsilon, the one reported.

Shares that add up to at most 1 partition the budget (PLD composition is in practice
sub-additive, so the total cap then never binds first); shares adding up to more than 1 let
phases compete for a common pool, and the total cap is what stops the last one.
`composed_caps` gives shares of the second kind that, composed, come out at the total: splitting
epsilon itself wastes about a third of a budget of 3 (caps 1.5 + 0.75 + 0.75 composed to 1.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from pmlm.common.privacy.accountant import (
    AccountantSettings,
    Composition,
    Epsilons,
    calibrate_gaussian,
    compose_epsilon,
    merge_repeats,
    rdp_epsilon_alone,
)
from pmlm.common.privacy.events import PRIVACY_UNITS, GaussianRelease, Mechanism, MechanismError

# dp-accounting's PLD lives on a grid spanning the whole privacy-loss range, so its cost grows
# with epsilon: seconds at epsilon ~700, petabytes of memory for a noise multiplier of 1e-6. A
# release whose RDP epsilon on its own exceeds this many times the total budget is refused on
# that figure, without building its PLD. RDP is the looser bound, so this can only err towards
# refusing, and only for releases that are absurd for any budget.
RDP_PREFILTER_FACTOR = 10.0


# Phase A's cap as a fraction of a site's whole budget, unless its policy says otherwise; phases B and C share
# what composition leaves (client/site_policy.py). A run that names only the whole budget asks for this share.
PHASE_A_SHARE = 0.5


@dataclass(frozen=True)
class BudgetConfig:
    epsilon_total: float
    delta: float
    shares: dict[str, float]

    def __post_init__(self) -> None:
        if isinstance(self.epsilon_total, bool) or not isinstance(self.epsilon_total, (int, float)) \
                or not math.isfinite(self.epsilon_total) or self.epsilon_total <= 0:
            raise ValueError(f"epsilon_total must be a finite number > 0, got {self.epsilon_total!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not isinstance(self.shares, dict) or not self.shares:
            raise ValueError("shares must be a non-empty mapping of phase name to fraction of epsilon_total")
        for phase, share in self.shares.items():
            if not isinstance(phase, str) or not phase:
                raise ValueError(f"phase names must be non-empty strings, got {phase!r}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"share of phase {phase!r} must be in (0, 1], got {share!r}")
        object.__setattr__(self, "shares", dict(self.shares))

    def phase_cap(self, phase: str) -> float:
        if phase not in self.shares:
            raise UnknownPhase(f"phase {phase!r} has no budget share; configured phases: {sorted(self.shares)}")
        return self.shares[phase] * self.epsilon_total

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon_total": self.epsilon_total, "delta": self.delta, "shares": dict(sorted(self.shares.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BudgetConfig":
        return cls(epsilon_total=data["epsilon_total"], delta=data["delta"], shares=dict(data["shares"]))


def composed_caps(epsilon_total: float, delta: float, fixed: dict[str, float], rest: Iterable[str]) -> dict[str, float]:
    """Per-phase epsilon caps: the `fixed` phases keep theirs, the `rest` share equally what composition leaves.

    Epsilons do not add up under composition, noise precisions do: Gaussian releases of noise multipliers
    s1, s2, ... compose exactly to one of multiplier s with 1/s^2 = sum 1/si^2. So each phase is priced as
    one Gaussian release: the total budget buys a multiplier s_total, a fixed cap buys s_fixed, and each of
    the other n phases gets the multiplier that leaves 1/s_total^2 - sum 1/s_fixed^2 shared n ways, and
    its cap is that release's epsilon. Real phases (subsampled DP-SGD, several releases) compose a little
    differently, so the caps can overshoot the total slightly; the total cap still stops the last release.
    """
    rest = list(rest)
    caps = dict(fixed)
    if not rest:
        return caps
    left = 1.0 / calibrate_gaussian(epsilon_total, delta) ** 2
    left -= sum(1.0 / calibrate_gaussian(min(cap, epsilon_total), delta) ** 2 for cap in fixed.values())
    if left <= 0:
        raise ValueError(f"phases {sorted(fixed)} take the whole budget {epsilon_total:g}; none is left for {rest}")
    sigma = math.sqrt(len(rest) / left)
    cap = min(compose_epsilon([GaussianRelease(sigma, 1.0)], delta).pld, epsilon_total)
    return {**caps, **{phase: cap for phase in rest}}


class UnknownPhase(ValueError):
    """A release charged to a phase the budget does not know (a configuration error, not a refusal)."""


class BudgetExhausted(Exception):
    """A release was refused because it would exceed the site's budget; no noise was drawn, nothing sent."""

    def __init__(self, site_id: str, charge: "Charge"):
        self.site_id = site_id
        self.charge = charge
        if charge.exceeded == "phase":
            scope, spent, after, cap = f"phase {charge.phase!r}", charge.phase_before.pld, charge.phase_after.pld, charge.phase_cap
        else:
            scope, spent, after, cap = "the total", charge.before.pld, charge.after.pld, charge.total_cap
        self.spent, self.requested, self.cap = spent, after - spent, cap
        self.remaining = max(cap - spent, 0.0)
        if not charge.priced_by_pld:
            super().__init__(
                f"privacy budget exhausted at site {site_id!r} ({charge.privacy_unit}): this "
                f"{charge.mechanism.kind} release would take RDP epsilon to {charge.screen_rdp:.4g} at delta "
                f"{charge.delta:g}, more than {RDP_PREFILTER_FACTOR:g} times the whole budget "
                f"({charge.total_cap:g}; spent {charge.before.pld:.4g}); is its noise multiplier "
                f"({charge.mechanism.noise_multiplier:g}) right? The release was refused before any noise "
                f"was drawn; nothing was sent, and the refusal is in the ledger."
            )
            return
        super().__init__(
            f"privacy budget exhausted at site {site_id!r} ({charge.privacy_unit}): this "
            f"{charge.mechanism.kind} release would raise {scope} epsilon from {spent:.4g} to {after:.4g}, "
            f"over its cap {cap:.4g} (spent {spent:.4g}, remaining {self.remaining:.4g}, requested "
            f"+{self.requested:.4g}, delta {charge.delta:g}). The release was refused before any noise "
            f"was drawn; nothing was sent, and the refusal is in the ledger."
        )


@dataclass
class Charge:
    """What one release would cost: epsilons before/after, for its unit and its phase, against the caps."""

    phase: str
    privacy_unit: str
    mechanism: Mechanism
    delta: float
    before: Epsilons
    after: Epsilons
    phase_before: Epsilons
    phase_after: Epsilons
    total_cap: float
    phase_cap: float
    screen_rdp: float  # the RDP epsilon the pre-filter judged (the unit's with this release; alone if rdp=False)
    # the compositions with the release added, kept so committing does not compose twice
    # (None when the pre-filter refused to build them)
    _unit_composition: Composition | None = field(repr=False)
    _phase_composition: Composition | None = field(repr=False)

    @property
    def priced_by_pld(self) -> bool:
        return self._unit_composition is not None

    @property
    def exceeded(self) -> str | None:
        """"phase" or "total" when the release would break that cap, else None."""
        if not self.priced_by_pld:
            return "total"
        if self.phase_after.pld > self.phase_cap:
            return "phase"
        if self.after.pld > self.total_cap:
            return "total"
        return None

    @property
    def fits(self) -> bool:
        return self.exceeded is None

    @property
    def margin(self) -> float:
        """How far under both caps the release leaves the unit (>= 0 exactly when it fits; -inf when unpriced)."""
        if not self.priced_by_pld:
            return -math.inf
        return min(self.phase_cap - self.phase_after.pld, self.total_cap - self.after.pld)


class BudgetState:
    """Running compositions of one site's releases: per privacy unit, and per unit and phase."""

    def __init__(self, budget: BudgetConfig, settings: AccountantSettings):
        self.budget = budget
        self.settings = settings
        self._units: dict[str, Composition] = {}
        self._phases: dict[tuple[str, str], Composition] = {}

    def _composition(self, unit: str, phase: str | None, neighbouring: str) -> Composition:
        table, key = (self._units, unit) if phase is None else (self._phases, (unit, phase))
        # Phases are capped on PLD; their RDP would double the cost of every charge for a number
        # nobody enforces, so phase compositions run PLD only.
        composition = table.get(key) or Composition(self.settings, neighbouring, with_rdp=phase is None)
        if composition.neighbouring != neighbouring:
            raise MechanismError(f"{unit} releases are accounted under {composition.neighbouring}, not {neighbouring}")
        return composition

    def price(self, phase: str, mechanism: Mechanism | Iterable[Mechanism], *, rdp: bool = True,
              screen: bool = True) -> Charge:
        """The cost of `mechanism` (or a planned sequence of them, all in one unit) in `phase`; changes nothing.

        rdp=False prices with PLD only (RDP epsilons read NaN); such a charge must not be committed.
        With rdp=False, screen=False skips the RDP pre-filter: only for a caller that knows this
        release, or one with less noise, already passed it.
        """
        mechanisms = list(mechanism) if not hasattr(mechanism, "to_dp_event") else [mechanism]
        if not mechanisms:
            raise ValueError("nothing to price")
        units = {m.privacy_unit for m in mechanisms}
        if len(units) != 1:
            raise MechanismError(f"one charge covers one privacy unit, got {sorted(units)}")
        unit = units.pop()
        phase_cap = self.budget.phase_cap(phase)
        unit_before = self._composition(unit, None, mechanisms[0].neighbouring)
        phase_before = self._composition(unit, phase, mechanisms[0].neighbouring)
        delta = self.budget.delta
        limit = RDP_PREFILTER_FACTOR * self.budget.epsilon_total
        if rdp:
            # the unit's own RDP accountant screens the release before any PLD is built
            unit_after = unit_before.with_added(mechanisms, rdp_screen=(delta, limit))
            screened = unit_after.pld_skipped
            screen_rdp = unit_after.epsilon(delta).rdp
        else:
            screen_rdp = rdp_epsilon_alone(tuple(merge_repeats(mechanisms)), delta) if screen else math.nan
            screened = screen_rdp > limit
            unit_after = None if screened else unit_before.with_added(mechanisms, rdp=False)
        if screened:
            unit_after = phase_after = None
            after, phase_after_eps = Epsilons(math.inf, screen_rdp), Epsilons(math.inf, math.nan)
        else:
            # While every release of the unit is this phase's (a site's first phase, every calibration of it), the
            # phase's PLD is the unit's: composing it again doubled the cost of each price.
            same = (phase_before.history == unit_before.history and not unit_before.pld_skipped
                    and not phase_before.pld_skipped)
            phase_after = unit_after.without_rdp() if same else phase_before.with_added(mechanisms)
            after, phase_after_eps = unit_after.epsilon(delta), phase_after.epsilon(delta)
        return Charge(
            phase=phase,
            privacy_unit=unit,
            mechanism=mechanisms[-1],
            delta=delta,
            before=unit_before.epsilon(delta),
            after=after,
            phase_before=phase_before.epsilon(delta),
            phase_after=phase_after_eps,
            total_cap=self.budget.epsilon_total,
            phase_cap=phase_cap,
            screen_rdp=screen_rdp,
            _unit_composition=unit_after,
            _phase_composition=phase_after,
        )

    def price_key(self, phase: str, mechanisms: Iterable[Mechanism]) -> tuple:
        """Everything `price(phase, mechanisms)` depends on, hashable: the budget, the accountant's settings and the
        histories of the unit's and the phase's compositions. Equal keys price equally, whichever site asks."""
        mechanisms = tuple(mechanisms)
        unit = mechanisms[0].privacy_unit
        before = [self._units.get(unit), self._phases.get((unit, phase))]
        return (self.budget.epsilon_total, self.budget.delta, tuple(sorted(self.budget.shares.items())), self.settings,
                phase, unit, mechanisms[0].neighbouring,
                *[None if c is None else (c.neighbouring, c.history) for c in before], mechanisms)

    def commit(self, charge: Charge) -> None:
        if not charge.priced_by_pld:
            raise ValueError("a charge refused by the RDP pre-filter cannot be committed")
        if math.isnan(charge.after.rdp):
            raise ValueError("a PLD-only trial charge cannot be committed")
        self._units[charge.privacy_unit] = charge._unit_composition
        self._phases[(charge.privacy_unit, charge.phase)] = charge._phase_composition

    def spent(self, privacy_unit: str = "patient-in-site", phase: str | None = None) -> Epsilons:
        if privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
        if phase is not None:
            self.budget.phase_cap(phase)  # unknown phase -> clear error
        composition = self._units.get(privacy_unit) if phase is None else self._phases.get((privacy_unit, phase))
        if composition is None:
            return Epsilons(0.0, 0.0 if phase is None else math.nan)
        return composition.epsilon(self.budget.delta)

    def remaining(self, privacy_unit: str = "patient-in-site", phase: str | None = None) -> float:
        cap = self.budget.epsilon_total if phase is None else self.budget.phase_cap(phase)
        return max(cap - self.spent(privacy_unit, phase).pld, 0.0)
