"""Noise shared across a secure sum: a site's `noise = "distributed"` policy (client/site_policy.py).

Under SecAgg+ the coordinator sees only the sum of the sites' vectors. If each of at least k sites adds
Gaussian noise of standard deviation σ/√k, the sum carries at least σ, the noise its ledger entry prices;
with S sites in the sum the noise grows as √(S/k)·σ instead of √S·σ, so the sum's signal-to-noise improves
as sites join. That holds only under TRUST_ASSUMPTION; without it the site has its own noise alone. So a
release with shared noise records two figures:

* ``epsilon`` (the entry's usual cumulative PLD field), priced at σ: the ε the site relies on, and the one
  its budget is enforced on (calibration and refusals are unchanged);
* ``noise.worst_case_epsilon``: the same privacy unit's cumulative ε with every release priced at the noise
  the site itself added (σ/√k for shared releases, σ for the rest), what is left if the assumption fails.

The ledger (common/privacy/ledger.py) writes the ``noise`` block and re-checks it on replay; `OwnNoise`
keeps the worst-case compositions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from pmlm.common.privacy.accountant import AccountantSettings, Composition, merge_repeats
from pmlm.common.privacy.events import Mechanism

NOISE_MODES = ("site", "distributed")
TRUST_ASSUMPTION = (
    "The ε relied on assumes that this release leaves only inside a SecAgg+ sum that at least min_sites sites, "
    "this one included, each add their share of the noise to honestly, that the coordinator runs the unmasking "
    "as the protocol says (Flower's SecAgg+ has no consistency round: a coordinator that sends sites "
    "contradictory drop-out lists can unmask any single vector), that fewer than min_sites of the parties "
    "(coordinator and sites) collude, that the nodes in the key exchange are distinct sites, and that no site "
    "re-sends a kept release to a different group. If any of that fails, the worst-case ε (this site's own "
    "noise alone) is what holds.")
_BLOCK_KEYS = {"mode", "min_sites", "site_noise_multiplier", "key_exchange", "worst_case_epsilon",
               "trust_assumption"}


class NoiseMismatch(ValueError):
    """A ledger entry's noise block does not describe its mechanism's noise under its stated mode."""


@dataclass(frozen=True)
class KeyExchange:
    """What SecAgg+'s key exchange showed the site itself: the node ids it exchanged keys with (itself
    included) and the reconstruction threshold its own secrets were split with. The threshold is not just
    the coordinator's word: it is the one the site's shares were made with, so it is what unmasking needs."""

    nodes: tuple[int, ...]
    threshold: int


@dataclass(frozen=True)
class NoiseSharing:
    """How a release shares its noise: min_sites 1 is the site's own full noise (noise "site"); k >= 2 adds
    σ/√k, after the site saw a key exchange of `sites` sites and `threshold` and found it safe for k
    (SitePolicy.noise_sharing)."""

    min_sites: int = 1
    sites: int = 1
    threshold: int = 1

    def __post_init__(self) -> None:
        for name in ("min_sites", "sites", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.sites < self.min_sites or self.threshold < self.min_sites:
            raise ValueError(f"a key exchange of {self.sites} sites with threshold {self.threshold} does not "
                             f"carry min_sites={self.min_sites}")

    @property
    def shared(self) -> bool:
        return self.min_sites > 1

    @property
    def mode(self) -> str:
        return NOISE_MODES[self.shared]

    def own(self, mechanism: Mechanism) -> Mechanism:
        """The mechanism of the noise this site itself adds (the relied-on one when the noise is not shared)."""
        if not self.shared:
            return mechanism
        return replace(mechanism, noise_multiplier=mechanism.noise_multiplier / math.sqrt(self.min_sites))

    def own_stddev(self, mechanism: Mechanism) -> float:
        return self.own(mechanism).noise_stddev

    def entry_block(self, mechanism: Mechanism, worst_case_epsilon: float) -> dict[str, Any]:
        """The ledger entry's ``noise`` field for a shared release."""
        return {
            "mode": self.mode, "min_sites": self.min_sites,
            "site_noise_multiplier": self.own(mechanism).noise_multiplier,
            "key_exchange": {"sites": self.sites, "threshold": self.threshold},
            "worst_case_epsilon": worst_case_epsilon, "trust_assumption": TRUST_ASSUMPTION,
        }


SITE_NOISE = NoiseSharing()


def sharing_of(block: Any, mechanism: Mechanism) -> NoiseSharing:
    """The NoiseSharing a ledger entry's ``noise`` block states (None: the site's own noise); raises
    NoiseMismatch when the block is malformed or its noise does not follow from the mechanism and the mode."""
    if block is None:
        return SITE_NOISE
    if not isinstance(block, dict) or set(block) != _BLOCK_KEYS:
        raise NoiseMismatch(f"noise block must have exactly the fields {sorted(_BLOCK_KEYS)}, got {block!r}")
    if block["mode"] != "distributed":
        raise NoiseMismatch(f"noise mode {block['mode']!r} in a noise block; only 'distributed' releases carry one")
    k, exchange = block["min_sites"], block["key_exchange"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise NoiseMismatch(f"distributed noise needs min_sites >= 2, got {k!r}")
    if not isinstance(exchange, dict) or set(exchange) != {"sites", "threshold"} or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in exchange.values()):
        raise NoiseMismatch(f"key_exchange must give integer sites and threshold, got {exchange!r}")
    if not isinstance(block["trust_assumption"], str) or not block["trust_assumption"].strip():
        raise NoiseMismatch("a distributed release must state its trust assumption")
    try:
        sharing = NoiseSharing(k, exchange["sites"], exchange["threshold"])
    except ValueError as exc:
        raise NoiseMismatch(str(exc)) from None
    stated, expected = block["site_noise_multiplier"], sharing.own(mechanism).noise_multiplier
    if not isinstance(stated, (int, float)) or isinstance(stated, bool) or \
            abs(stated - expected) > 1e-9 * max(1.0, expected):
        raise NoiseMismatch(f"site_noise_multiplier {stated!r} is not the mechanism's σ/√{k} = {expected!r}")
    return sharing


class OwnCharge(NamedTuple):
    """A release's own noise composed into its unit's worst case (composition None: nothing shared yet)."""

    unit: str
    own: Mechanism
    composition: Composition | None


class OwnNoise:
    """Per privacy unit, every release composed at the noise the site itself added: its ε if every secure sum
    it relied on were unmasked. Until a unit's first shared release this equals the relied-on composition, so
    only the mechanisms are kept; from then on a running PLD composition (a second one only for such units)."""

    def __init__(self, settings: AccountantSettings):
        self.settings = settings
        self._unshared: dict[str, list[Mechanism]] = {}
        self._composed: dict[str, Composition] = {}

    def price(self, mechanism: Mechanism, sharing: NoiseSharing) -> OwnCharge:
        unit, own = mechanism.privacy_unit, sharing.own(mechanism)
        base = self._composed.get(unit)
        if base is None and not sharing.shared:
            return OwnCharge(unit, own, None)
        if base is None:
            base = Composition(self.settings, own.neighbouring, with_rdp=False).with_added(
                merge_repeats(self._unshared.get(unit, [])), rdp=False)
        return OwnCharge(unit, own, base.with_added(own, rdp=False))

    def commit(self, charge: OwnCharge) -> None:
        if charge.composition is None:
            self._unshared.setdefault(charge.unit, []).append(charge.own)
        else:
            self._composed[charge.unit] = charge.composition
            self._unshared.pop(charge.unit, None)

    def epsilon(self, unit: str, delta: float) -> float | None:
        """The unit's worst-case ε so far; None when none of its releases shared noise (then it is `epsilon`)."""
        composition = self._composed.get(unit)
        return None if composition is None else composition.epsilon(delta).pld
