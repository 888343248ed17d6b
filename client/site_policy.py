"""The site's own privacy policy: what this hospital answers, at what price, whoever the coordinator is.

The coordinator's run config can only ask for *less* than the policy: a request for more budget, a larger
delta, a non-private run, an exact evaluation, a plain (unmasked) release or a path-like run name is
refused before anything is computed. The refusal is a signed `policy_refusal` line in the site's ledger
and an error reply that names the limit; nothing else leaves the site.

Where the policy comes from (first found wins, key by key): the SuperNode's node config (`policy-*` keys,
e.g. `--node-config "policy-epsilon-total=3 policy-delta=1e-5"`), then the `privacy` section of
`SITE_DIR/site.json` (client/site_config.py), then the defaults below. Never the run config.

    {"epsilon_total": 3.0, "delta": 1e-5, "phase_a_share": 0.5, "allow_non_private": false,
     "secure_sum_only": true, "answer_evaluate": false, "smaller_group_retry": false, "public": [],
     "phase_a_train": true}

`phase_a_train: false` makes the site a receiver of phase A: it answers each training round with a reply that
carries no weights (and is charged nothing), and still keeps and adapts the consortium's final model. A small clinic's
DP-SGD update is mostly noise (a dozen training patients against a hospital's ~150) and every site weighs the same in
FedAvg, so its update pulls the shared model down for everyone, itself included. The operator sets it, not the data
size: a rule on the patient count would make taking part reveal it.

`noise: "distributed"` with `min_sites: k` (an integer >= 2) shares the noise of phase B and C releases across
the secure sum: the site adds σ/√k, so a SecAgg+ sum of at least k sites carries the σ its ledger prices
(common/privacy/shared_noise.py). Before each such release the site checks what the key exchange showed it
(`noise_sharing`); plain releases are refused (it needs `secure_sum_only`). The default `"site"` adds σ itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pmlm.common.privacy.budget import PHASE_A_SHARE, BudgetConfig, composed_caps
from pmlm.common.privacy.shared_noise import NOISE_MODES, SITE_NOISE, KeyExchange, NoiseSharing
from pmlm.common.site_layout import SITE_JSON

NODE_CONFIG_PREFIX = "policy-"
# Site-level figures a site may declare public (they then appear in ledger entries and reports).
PUBLIC_FIGURES = ("population_size",)
# Names that become file names at the site (run ids): no separators, no leading dot.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$")
LATER_PHASES = ("phase_b", "phase_c")


class PolicyRefusal(PermissionError):
    """A request outside the site's policy; `limit` names the rule, the message says what was asked."""

    def __init__(self, limit: str, reason: str):
        self.limit = limit
        super().__init__(f"refused by the site's privacy policy ({limit}): {reason}")


class PolicyError(ValueError):
    """The site's own policy is malformed (an operator error, raised at start, never a silent default)."""


@dataclass(frozen=True)
class SitePolicy:
    epsilon_total: float = 3.0  # the site's whole lifetime budget per patient (PLD, enforced by the ledger)
    delta: float = 1e-5
    phase_a_share: float = PHASE_A_SHARE  # phase A's cap as a fraction of the total; B and C share what composition leaves
    allow_non_private: bool = False  # only a site's own benchmark turns this on
    secure_sum_only: bool = True  # phase B and C vectors leave only masked under SecAgg+
    answer_evaluate: bool = False  # phase A's evaluate handler: exact metrics on the validation split
    smaller_group_retry: bool = False  # re-send a kept release to a smaller SecAgg+ group (per-site DP alone)
    public: tuple[str, ...] = ()  # site-level figures declared public (PUBLIC_FIGURES)
    phase_a_train: bool = True  # false: receive the consortium's recommender without training it (see above)
    noise: str = "site"  # "distributed": share phase B/C noise across secure sums of >= min_sites sites (see above)
    min_sites: int | None = None  # k for noise "distributed"

    def __post_init__(self) -> None:
        for name in ("epsilon_total", "delta", "phase_a_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PolicyError(f"policy {name} must be a finite number, got {value!r}")
        if self.epsilon_total <= 0:
            raise PolicyError(f"policy epsilon_total must be > 0, got {self.epsilon_total!r}")
        if not 0 < self.delta < 1:
            raise PolicyError(f"policy delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.phase_a_share < 1:
            raise PolicyError(f"policy phase_a_share must be in (0, 1), got {self.phase_a_share!r}")
        for name in ("allow_non_private", "secure_sum_only", "answer_evaluate", "smaller_group_retry",
                     "phase_a_train"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"policy {name} must be true or false, got {getattr(self, name)!r}")
        if self.noise not in NOISE_MODES:
            raise PolicyError(f"policy noise must be one of {list(NOISE_MODES)}, got {self.noise!r}")
        if self.noise == "distributed":
            if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int) or self.min_sites < 2:
                raise PolicyError(f"policy noise 'distributed' needs min_sites, an integer >= 2, "
                                  f"got {self.min_sites!r}")
            if not self.secure_sum_only:
                raise PolicyError("policy noise 'distributed' needs secure_sum_only true: a plain release would "
                                  "carry only this site's share of the noise")
        elif self.min_sites is not None:
            raise PolicyError(f"policy min_sites ({self.min_sites!r}) applies only to noise 'distributed'")
        unknown = set(self.public) - set(PUBLIC_FIGURES)
        if unknown:
            raise PolicyError(f"policy public lists unknown figures {sorted(unknown)}; known: {list(PUBLIC_FIGURES)}")
        object.__setattr__(self, "public", tuple(sorted(set(self.public))))

    # -- where it comes from -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "policy") -> "SitePolicy":
        if not isinstance(raw, dict):
            raise PolicyError(f"{source}: the privacy policy must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise PolicyError(f"{source}: unknown privacy policy keys {sorted(unknown)}; known: {sorted(names)}")
        values = dict(raw)
        if "public" in values:
            values["public"] = tuple(values["public"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, site_dir: Path | None, node_config: dict | None = None) -> "SitePolicy":
        """The policy of the site at `site_dir`: node config `policy-*` keys over site.json's `privacy`."""
        raw: dict[str, Any] = {}
        site_json = Path(site_dir) / SITE_JSON if site_dir is not None else None
        if site_json is not None and site_json.is_file():
            try:
                section = json.loads(site_json.read_text()).get("privacy") or {}
            except (json.JSONDecodeError, AttributeError) as exc:
                raise PolicyError(f"{site_json}: malformed site configuration ({exc})") from None
            if not isinstance(section, dict):
                raise PolicyError(f"{site_json}: 'privacy' must be a JSON object")
            raw.update(section)
        for key, value in (node_config or {}).items():
            if str(key).startswith(NODE_CONFIG_PREFIX):
                raw[str(key)[len(NODE_CONFIG_PREFIX):].replace("-", "_")] = _node_value(value)
        return cls.from_dict(raw, source=str(site_json) if site_json else "node config")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "public": list(self.public)}

    # -- what it allows ------------------------------------------------------------------------

    def phase_caps(self, epsilon_total: float | None = None, phase_a: float | None = None) -> dict[str, float]:
        """Per-phase epsilon caps for a total (default: the policy's) with phase A at its share of it."""
        total = self.epsilon_total if epsilon_total is None else epsilon_total
        a = self.phase_a_share * total if phase_a is None else min(phase_a, total)
        if a >= total * (1 - 1e-9):
            return {"phase_a": total, **{p: 0.0 for p in LATER_PHASES}}
        return composed_caps(total, self.delta, {"phase_a": a}, LATER_PHASES)

    def budget(self) -> BudgetConfig:
        """The ledger's budget: fixed by the policy when the ledger opens, never by a run."""
        caps = self.phase_caps()
        return BudgetConfig(epsilon_total=self.epsilon_total, delta=self.delta,
                            shares={p: c / self.epsilon_total for p, c in caps.items()})

    def run_caps(self, epsilon: float, epsilon_total: float, delta: float) -> dict[str, float]:
        """The per-phase caps a run may spend up to: what the coordinator asked for, checked against the policy.

        `epsilon` is the phase-A cap the run asks for (<= 0: a non-private run), `epsilon_total` the whole budget
        it asks for (0: epsilon / phase_a_share). Raises PolicyRefusal for anything above the policy."""
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
            raise PolicyRefusal("epsilon", f"phase A epsilon {epsilon!r} is not a finite number")
        if epsilon <= 0:
            if not self.allow_non_private:
                raise PolicyRefusal("allow_non_private", f"the run asks for a non-private phase A (epsilon "
                                    f"{epsilon:g}); this site releases only DP-trained weights")
            return {}
        if delta != self.delta:
            raise PolicyRefusal("delta", f"the run asks for delta {delta!r}; this site accounts every release at "
                                f"its own delta {self.delta!r} (ask with that delta, or without one)")
        caps = self.phase_caps()
        total = epsilon_total or epsilon / self.phase_a_share
        if not math.isfinite(total) or total > self.epsilon_total * (1 + 1e-9):
            raise PolicyRefusal("epsilon_total", f"the run asks for a budget of {total:g}; this site's whole "
                                f"budget is {self.epsilon_total:g}")
        if epsilon > caps["phase_a"] * (1 + 1e-9):
            raise PolicyRefusal("phase_a", f"the run asks for phase A epsilon {epsilon:g}; this site's phase A "
                                f"cap is {caps['phase_a']:g}")
        asked = self.phase_caps(total, epsilon)
        return {p: min(asked[p], caps[p]) for p in caps}

    def check_run_id(self, run_id: str) -> str:
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
            raise PolicyRefusal("run_id", f"run id {run_id!r} is not a plain name ({RUN_ID_PATTERN.pattern}); "
                                f"it would become a file name at the site")
        return run_id

    def check_plain_release(self, what: str) -> None:
        if self.secure_sum_only:
            raise PolicyRefusal("secure_sum_only", f"{what} asked for as a plain (unmasked) release; this site "
                                f"releases phase B and C vectors only under secure aggregation")

    def noise_sharing(self, keys: KeyExchange | None) -> NoiseSharing:
        """The share of the noise this release may add itself, checked against the SecAgg+ key exchange `keys`
        the site saw (None: a plain release). With noise "distributed" it refuses unless at least min_sites
        sites (this one included) exchanged keys, and unless its secrets were shared with a threshold of at
        least min_sites: fewer than min_sites colluding parties (the coordinator and others) then hold fewer
        shares than unmasking its vector needs, and a protocol-following unmasking of any total that includes
        it needs that many of its group to have sent theirs, so the total carries their noise."""
        if self.noise == "site":
            return SITE_NOISE
        k = self.min_sites
        if keys is None:
            raise PolicyRefusal("noise", f"a plain (unmasked) release asked for; with noise 'distributed' this site "
                                f"adds only σ/√{k} and releases phase B and C vectors only inside a secure sum")
        if len(keys.nodes) < k:
            raise PolicyRefusal("min_sites", f"only {len(keys.nodes)} sites (this one included) exchanged keys "
                                f"for this secure sum; this site shares its noise only with at least {k}")
        if keys.threshold < k:
            raise PolicyRefusal("min_sites", f"this secure sum's reconstruction threshold is {keys.threshold}: the "
                                f"coordinator could unmask a total of only {keys.threshold} sites' vectors, or this "
                                f"site's own with {keys.threshold} colluding sites' shares, while it carries only "
                                f"σ/√{k}; this site shares its noise only under a threshold of at least {k}")
        return NoiseSharing(k, len(keys.nodes), keys.threshold)

    def check_evaluate(self, split: str) -> None:
        if not self.answer_evaluate:
            raise PolicyRefusal("answer_evaluate", "the coordinator asked for exact evaluation metrics on the "
                                "site's records; this site does not answer evaluation requests")
        if split != "val":
            raise PolicyRefusal("answer_evaluate", f"evaluation on split {split!r} asked for; this site answers "
                                f"evaluation on its validation split only")

    def population_size(self, n: int) -> int | None:
        """`n` for a ledger entry when the site declared its population public, else None (N is private)."""
        return n if "population_size" in self.public else None


def _node_value(value: Any) -> Any:
    """Node-config values arrive as TOML scalars or strings; lists as JSON text."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return value
