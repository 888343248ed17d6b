"""Differentially private mechanisms described as plain data.

A mechanism object says everything an accountant needs to price one release: the noise,
how records were sampled, how many times it ran, what one privacy unit can change and
what "neighbouring datasets" means. It carries no noise and no data, serialises to a
JSON-ready dict, and is rebuilt from that dict, so an auditor can re-price a ledger
from the file alone. ``to_dp_event()`` gives the matching `dp-accounting` event.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Union

import dp_accounting

# Who is protected. "patient-in-site": adding or removing all records of one patient at
# one hospital (record-level DP). "site": adding or removing one whole hospital's
# contribution (hospital-level DP). The two are separate guarantees and never composed together.
PRIVACY_UNITS = ("patient-in-site", "site")

# The neighbouring relation, named after dp-accounting's NeighboringRelation. Only add/remove
# is offered: in dp-accounting 0.6 the PLD accountant prices a GaussianDpEvent under REPLACE_ONE
# as sensitivity 2 while the RDP accountant prices it as sensitivity 1 (so the two reported
# epsilons would describe different mechanisms), and RDP rejects Poisson-sampled events under
# REPLACE_ONE. A replace-one guarantee follows from add/remove by group privacy (two changes).
NEIGHBOURING_RELATIONS = {
    "add-remove-one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}


class MechanismError(ValueError):
    """A mechanism description that cannot be accounted for."""


def _check_common(mech: "Mechanism") -> None:
    if mech.privacy_unit not in PRIVACY_UNITS:
        raise MechanismError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {mech.privacy_unit!r}")
    if mech.neighbouring not in NEIGHBOURING_RELATIONS:
        raise MechanismError(
            f"neighbouring must be one of {tuple(NEIGHBOURING_RELATIONS)}, got {mech.neighbouring!r}"
        )
    # noise_multiplier 0 would be a non-private release with infinite epsilon: refuse to describe it.
    _positive_number("noise_multiplier", mech.noise_multiplier)


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MechanismError(f"{name} must be a finite number > 0, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MechanismError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class DpSgd:
    """Local DP-SGD (Opacus): `steps` Poisson-sampled steps with per-unit clipping and Gaussian noise.

    noise_multiplier: noise std divided by clipping_norm; sampling_rate: the probability that
    a unit's data is in a step's batch (batch size / number of units); clipping_norm: the L2
    bound on one unit's gradient contribution. Accounting assumes Poisson sampling.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    clipping_norm: float
    privacy_unit: str = "patient-in-site"
    neighbouring: str = "add-remove-one"

    kind: ClassVar[str] = "dp-sgd"

    def __post_init__(self) -> None:
        _check_common(self)
        if isinstance(self.sampling_rate, bool) or not (
                isinstance(self.sampling_rate, (int, float)) and 0 < self.sampling_rate <= 1):
            raise MechanismError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        _positive_int("steps", self.steps)
        _positive_number("clipping_norm", self.clipping_norm)

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the Gaussian noise added to the summed clipped gradients."""
        return self.noise_multiplier * self.clipping_norm

    def repeated(self, times: int) -> "DpSgd":
        """The same training continued for `times` as many steps."""
        return replace(self, steps=self.steps * times)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)


@dataclass(frozen=True)
class GaussianRelease:
    """The Gaussian mechanism on a value whose L2 sensitivity to one unit is `l2_sensitivity`.

    Adds N(0, (noise_multiplier * l2_sensitivity)^2) to each coordinate; `releases` counts
    independent releases of this shape priced together in one entry (e.g. one per round).
    l2_sensitivity bounds the L2 change of the whole released vector when one unit's data is
    added or removed (clip each unit's contribution first).
    """

    noise_multiplier: float
    l2_sensitivity: float
    releases: int = 1
    privacy_unit: str = "patient-in-site"
    neighbouring: str = "add-remove-one"

    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_common(self)
        _positive_number("l2_sensitivity", self.l2_sensitivity)
        _positive_int("releases", self.releases)

    @property
    def noise_stddev(self) -> float:
        return self.noise_multiplier * self.l2_sensitivity

    def repeated(self, times: int) -> "GaussianRelease":
        return replace(self, releases=self.releases * times)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        single = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return single if self.releases == 1 else dp_accounting.SelfComposedDpEvent(single, self.releases)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)


Mechanism = Union[DpSgd, GaussianRelease]

MECHANISM_TYPES: dict[str, type] = {DpSgd.kind: DpSgd, GaussianRelease.kind: GaussianRelease}


def mechanism_from_dict(data: dict[str, Any]) -> Mechanism:
    """Rebuild a mechanism of any known type from its ``to_dict()`` form."""
    if not isinstance(data, dict):
        raise MechanismError(f"a mechanism must be a JSON object, got {type(data).__name__}")
    cls = MECHANISM_TYPES.get(data.get("type"))
    if cls is None:
        raise MechanismError(f"unknown mechanism type {data.get('type')!r}; known: {sorted(MECHANISM_TYPES)}")
    return _from_dict(cls, data)


def _from_dict(cls, data: dict[str, Any]):
    # Strict on purpose: a ledger field we do not understand must not be silently ignored.
    if not isinstance(data, dict) or data.get("type") != cls.kind:
        raise MechanismError(f"not a {cls.kind} mechanism: {data!r}")
    names = {f.name for f in fields(cls)}
    given = set(data) - {"type"}
    if given - names:
        raise MechanismError(f"{cls.kind}: unexpected fields {sorted(given - names)}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "type"})
    except TypeError as exc:  # a required field is missing
        raise MechanismError(f"{cls.kind}: {exc}") from None
