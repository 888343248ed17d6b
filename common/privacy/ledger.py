"""The site's privacy ledger: an append-only, hash-chained, signed JSON-lines file.

One line per event, in canonical JSON:

* ``open``     (first line only) the site's public key, budget and accountant settings;
* ``release``  a DP release: phase, round, run, the mechanism as data, and the cumulative
               epsilon of its privacy unit (PLD and RDP) and of its phase (PLD) after it; a release
               whose noise is shared across a secure sum adds a ``noise`` block with the worst-case
               epsilon of the site's own noise alone (common/privacy/shared_noise.py);
* ``refusal``  a release refused for lack of budget, with what it would have cost;
* ``recovery`` an operator-approved removal of a torn last line left by a crash;
* ``policy_refusal`` a request outside the site's own privacy policy (client/site_policy.py), refused
               before anything was computed: what was asked, the rule it broke, why.

Every line carries the SHA-256 of the previous line and an Ed25519 signature by the site's
key. Releases are written (and fsynced) before the caller may send anything, so a crash can
lose a release that was never sent, never send one that is not in the ledger. A site that dies
after recording and before its reply leaves is over-charged (the entry stays), never under-charged.

A release is charged once per (run, phase, round, privacy unit): asking again for a round that
is already in the ledger raises `AlreadyReleased` before anything is priced or drawn, so a
coordinator that re-sends a round (a retry, a restarted server) cannot make a site pay twice.
Phases that can be retried resend the release they kept (`common/privacy/kept.py`).

`LedgerReplay` re-checks a ledger from its bytes (chain, signatures, canonical form, and
every epsilon re-priced with dp-accounting); `SiteLedger` is what a site's code charges.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pmlm.common.atomic import append_durably, write_atomic
from pmlm.common.privacy.accountant import (
    ACCOUNTANT,
    AccountantSettings,
    CalibrationError,
    Epsilons,
    merge_repeats,
    smallest_noise_multiplier,
)
from pmlm.common.privacy.budget import BudgetConfig, BudgetExhausted, BudgetState, Charge, UnknownPhase
from pmlm.common.privacy.events import Mechanism, MechanismError, mechanism_from_dict
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseMismatch, NoiseSharing, OwnCharge, OwnNoise, sharing_of
from pmlm.common.privacy.signing import (
    GENESIS_PREV_HASH,
    SITE_ENTRY_DOMAIN,
    KeyFileError,
    canonical_json,
    key_fingerprint,
    line_hash,
    load_or_create_private_key,
    public_key_b64,
    public_key_from_b64,
    sign,
    signature_valid,
)
from pmlm.common.site_layout import LEDGER_PATH, SITE_KEY_PATH

LEDGER_FORMAT = "pmlm-privacy-ledger/1"
SITE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENTRY_KINDS = ("open", "release", "refusal", "recovery", "policy_refusal")
_COMMON_FIELDS = {"seq", "kind", "time", "site_id", "run_id", "prev_hash", "signature"}
_CHARGE_FIELDS = _COMMON_FIELDS | {"phase", "round", "privacy_unit", "mechanism", "delta", "accountant",
                                   "epsilon", "epsilon_rdp", "phase_epsilon", "population_size", "extra"}
REQUIRED_FIELDS = {
    "open": _COMMON_FIELDS | {"format", "public_key", "key_fingerprint", "budget", "accountant_settings", "accountant"},
    "release": _CHARGE_FIELDS | {"noise_source"},
    "refusal": _CHARGE_FIELDS | {"requested", "limit", "cap", "reason"},
    "recovery": _COMMON_FIELDS | {"torn_bytes", "torn_sha256", "torn_saved_as"},
    "policy_refusal": _COMMON_FIELDS | {"phase", "round", "request", "limit", "reason"},
}
UNSPECIFIED_NOISE_SOURCE = "unspecified"

T = TypeVar("T")


class LedgerError(Exception):
    """Base class of ledger failures."""


class LedgerCorrupted(LedgerError):
    """The ledger on disk fails verification; the site must not release until someone looks."""

    def __init__(self, path: Path, problems: list["Problem"]):
        self.path = path
        self.problems = problems
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"privacy ledger {path} fails verification at {problems[0]}{more}")


class LedgerTornTail(LedgerCorrupted):
    """The last line was cut short by a crash mid-write; it is neither dropped nor repaired silently."""

    def __init__(self, path: Path, problems: list["Problem"]):
        super().__init__(path, problems)
        self.args = (
            f"{self.args[0]}. The interrupted release was never sent (entries are written before "
            f"sending). To continue, open the ledger with SiteLedger(..., recover_torn_tail=True): it "
            f"moves the torn bytes to a side file and appends a signed 'recovery' entry recording them.",
        )


class LedgerConfigMismatch(LedgerError):
    """A restart asked for a different site, budget or accountant setting than the ledger holds."""


class LedgerConflict(LedgerError):
    """The file changed under us in a way appends cannot explain (truncated or rewritten)."""


class LedgerMissing(LedgerError):
    """The ledger file is gone while the site's key is still there: the site has released before, so a new
    ledger would silently restart its budget from zero."""

    def __init__(self, path: Path, key_path: Path):
        self.path, self.key_path = path, key_path
        super().__init__(
            f"privacy ledger {path} is missing, but the site key {key_path} exists: this site has signed "
            f"releases before, and a new ledger would restart its privacy budget from zero. Restore the ledger "
            f"from a backup (the coordinator's copy, STATE_DIR/ledger_copies/<site>.jsonl, shows what it held). "
            f"Only if you are sure nothing was ever released under this key, start a new ledger deliberately "
            f"with SiteLedger(..., start_over_with_existing_key=True).")


class AlreadyReleased(LedgerError):
    """This round of this run was already released and charged; it is not charged (or drawn) again."""

    def __init__(self, site_id: str, entry: dict[str, Any], detail: str = ""):
        self.entry = entry
        super().__init__(
            f"site {site_id} already released round {entry['round']} of {entry['phase']} in run "
            f"{entry['run_id']} (ledger entry {entry['seq']}); a round is charged once and not drawn again"
            + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Problem:
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"entry {self.seq} (line {self.line})" if self.seq is not None else f"line {self.line}"
        return f"{where}: {self.message}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _close(a: float, b: Any) -> bool:
    if math.isinf(a):  # a release refused without PLD pricing records its epsilon as null
        return b is None
    return isinstance(b, (int, float)) and not isinstance(b, bool) and abs(a - b) <= 1e-9 * max(1.0, abs(a))


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


class LedgerReplay:
    """Reads a ledger line by line and re-checks everything an auditor relies on.

    With `trusted_key`, the open entry must name that key and every signature must verify
    with it; without one, the key embedded in the open entry is used (this proves only that
    the file is internally consistent, not who wrote it). Problems are collected, not raised,
    so a verifier can name every failing entry.
    """

    def __init__(self, trusted_key: Ed25519PublicKey | None = None, *, allow_gaps: bool = False):
        # allow_gaps: for a subset of a ledger (the coordinator's copy holds only what sites
        # shipped): sequence numbers must only increase, and the chain is checked across
        # consecutive entries. Dropped refusals do not change any composition, so re-pricing
        # still holds as long as no release is missing.
        self.allow_gaps = allow_gaps
        self.last_seq = -1
        self.trusted_key = trusted_key
        self.key: Ed25519PublicKey | None = trusted_key
        self.genesis: dict[str, Any] | None = None
        self.budget: BudgetConfig | None = None
        self.settings: AccountantSettings | None = None
        self.state: BudgetState | None = None
        self.own_noise: OwnNoise | None = None  # the worst-case compositions of releases with shared noise
        self.entries: list[dict[str, Any]] = []
        self.problems: list[Problem] = []
        self.lines = 0
        self.last_hash = GENESIS_PREV_HASH
        self.torn_tail: bytes | None = None
        self._unit_epsilon: dict[str, float] = {}
        self._phase_epsilon: dict[tuple[str, str], float] = {}

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def site_id(self) -> str | None:
        return self.genesis.get("site_id") if self.genesis else None

    def worst_case_epsilon(self, unit: str) -> float | None:
        """`unit`'s cumulative ε with every release at the noise the site added itself (its worst case);
        None when none of its releases shared noise across a secure sum (then it is the enforced ε)."""
        return None if self.own_noise is None else self.own_noise.epsilon(unit, self.budget.delta)

    def feed_bytes(self, data: bytes, *, stop_at_first: bool = False) -> None:
        *complete, tail = data.split(b"\n")
        for line in complete:
            self.feed_line(line)
            if stop_at_first and self.problems:
                return
        if tail:
            self.torn_tail = tail
            self.problems.append(Problem(
                self.lines + 1, None,
                f"incomplete last line ({len(tail)} bytes without a terminating newline): a write was "
                f"interrupted, e.g. by a crash; this entry was never committed",
            ))

    def feed_line(self, line: bytes) -> dict[str, Any] | None:
        self.lines += 1
        lineno, expected_seq = self.lines, self.lines - 1
        prev_hash, self.last_hash = self.last_hash, line_hash(line)

        def problem(message: str, seq: int | None = expected_seq) -> None:
            self.problems.append(Problem(lineno, seq, message))

        try:
            entry = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            problem(f"not a valid JSON entry ({exc})")
            return None
        if not isinstance(entry, dict):
            problem("not a JSON object")
            return None
        seq = entry.get("seq")
        seq_label = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        consecutive = seq_label is not None and seq_label == self.last_seq + 1
        if self.allow_gaps and lineno > 1:
            if seq_label is None or seq_label <= self.last_seq:
                problem(f"sequence number {seq!r} does not follow {self.last_seq} (an entry was "
                        f"duplicated or moved)", seq_label)
        elif seq != expected_seq:
            problem(f"sequence number is {seq!r}, expected {expected_seq} (an entry was removed, "
                    f"inserted or moved)", seq_label)
        if seq_label is not None:
            self.last_seq = max(self.last_seq, seq_label)
        if canonical_json(entry) != line:
            problem("bytes differ from the entry's canonical form (the line was edited)", seq_label)
        if (not self.allow_gaps or consecutive) and entry.get("prev_hash") != prev_hash:
            problem("prev_hash does not match the previous line (the chain is broken: an earlier "
                    "entry was changed, removed or reordered)", seq_label)

        kind = entry.get("kind")
        if lineno == 1:
            if kind != "open":
                problem(f"first entry must be kind 'open', found {kind!r}", seq_label)
                return None
            self._open(entry, problem)
        elif kind == "open" or kind not in ENTRY_KINDS:
            problem(f"unexpected entry kind {kind!r}", seq_label)
            return None

        unsigned = {k: v for k, v in entry.items() if k != "signature"}
        if self.key is not None and not signature_valid(
            self.key, SITE_ENTRY_DOMAIN, canonical_json(unsigned), entry.get("signature")
        ):
            problem(f"signature does not verify with the site key {key_fingerprint(self.key)}", seq_label)
        if self.genesis is not None and entry.get("site_id") != self.site_id:
            problem(f"site_id {entry.get('site_id')!r} differs from the ledger's {self.site_id!r}", seq_label)
        missing = sorted(REQUIRED_FIELDS[kind] - set(entry))
        if missing:
            problem(f"missing fields {missing}", seq_label)
        try:
            datetime.fromisoformat(entry.get("time"))
        except (TypeError, ValueError):
            problem(f"time {entry.get('time')!r} is not an ISO 8601 timestamp", seq_label)
        if kind in ("release", "refusal"):
            self._reprice(entry, lambda m: problem(m, seq_label))
        self.entries.append(entry)
        return entry

    def _open(self, entry: dict[str, Any], problem: Callable[[str], None]) -> None:
        try:
            if entry.get("format") != LEDGER_FORMAT:
                raise ValueError(f"unknown ledger format {entry.get('format')!r}")
            embedded = public_key_from_b64(entry["public_key"])
            budget = BudgetConfig.from_dict(entry["budget"])
            settings = AccountantSettings.from_dict(entry["accountant_settings"])
        except (KeyError, TypeError, ValueError, KeyFileError) as exc:
            problem(f"malformed open entry: {exc!r}")
            return
        if self.trusted_key is not None and public_key_b64(embedded) != public_key_b64(self.trusted_key):
            problem(f"the ledger was opened with key {key_fingerprint(embedded)}, not the trusted site key "
                    f"{key_fingerprint(self.trusted_key)}")
        self.key = self.trusted_key or embedded
        self.genesis, self.budget, self.settings = entry, budget, settings
        self.state = BudgetState(budget, settings)
        self.own_noise = OwnNoise(settings)

    def _reprice(self, entry: dict[str, Any], problem: Callable[[str], None]) -> None:
        if self.state is None:
            problem("cannot re-price: the ledger has no valid open entry")
            return
        try:
            mechanism = mechanism_from_dict(entry.get("mechanism"))
            charge = self.state.price(entry.get("phase"), mechanism)
        except (MechanismError, UnknownPhase, TypeError) as exc:
            problem(f"cannot re-price: {exc}")
            return
        if entry.get("privacy_unit") != charge.privacy_unit:
            problem(f"privacy_unit {entry.get('privacy_unit')!r} differs from its mechanism's {charge.privacy_unit!r}")
        if entry.get("delta") != self.budget.delta:
            problem(f"delta {entry.get('delta')!r} differs from the budget's {self.budget.delta!r}")
        recorded_after = (charge.after, charge.phase_after) if entry["kind"] == "release" else (charge.before, charge.phase_before)
        expected = {
            "epsilon": recorded_after[0].pld, "epsilon_rdp": recorded_after[0].rdp,
            "phase_epsilon": recorded_after[1].pld,
        }
        for name, value in expected.items():
            if not _close(value, entry.get(name)):
                problem(f"{name} is {entry.get(name)!r} but re-computing gives {value!r} "
                        f"(recorded with {entry.get('accountant')}, re-computed with {ACCOUNTANT})")
        unit, phase = charge.privacy_unit, charge.phase
        for key, table, name in ((unit, self._unit_epsilon, "epsilon"), ((unit, phase), self._phase_epsilon, "phase_epsilon")):
            value = entry.get(name)
            if isinstance(value, (int, float)) and key in table and value < table[key]:
                problem(f"cumulative {name} decreased from {table[key]!r} to {value!r}")
            if isinstance(value, (int, float)):
                table[key] = max(value, table.get(key, value))
        if entry["kind"] == "release":
            own = self._price_own_noise(entry, charge.mechanism, problem)
            if not charge.fits:
                problem(f"release exceeded the {charge.exceeded} budget (epsilon {charge.after.pld:.6g}, "
                        f"phase epsilon {charge.phase_after.pld:.6g})")
            if charge.priced_by_pld:  # keep re-pricing what follows as the site would have
                self.state.commit(charge)
                if own is not None:
                    self.own_noise.commit(own)
        else:
            requested = entry.get("requested") or {}
            for name, value in (("epsilon", charge.after.pld), ("epsilon_rdp", charge.after.rdp),
                                ("phase_epsilon", charge.phase_after.pld)):
                if not _close(value, requested.get(name)):
                    problem(f"requested {name} is {requested.get(name)!r} but re-computing gives {value!r}")
            if charge.fits:
                problem("refusal of a release that fits the budget")

    def _price_own_noise(self, entry: dict[str, Any], mechanism: Mechanism,
                         problem: Callable[[str], None]) -> OwnCharge | None:
        """The release's own noise priced into its unit's worst case; a noise block that does not follow from
        the mechanism under its stated mode, or whose worst-case epsilon does not re-compute, is a problem."""
        try:
            sharing = sharing_of(entry.get("noise"), mechanism)
        except NoiseMismatch as exc:
            problem(f"noise: {exc}")
            return None
        own = self.own_noise.price(mechanism, sharing)
        if sharing.shared:
            worst = own.composition.epsilon(self.budget.delta).pld
            if not _close(worst, entry["noise"]["worst_case_epsilon"]):
                problem(f"noise worst_case_epsilon is {entry['noise']['worst_case_epsilon']!r} but re-computing "
                        f"the site's own noise alone gives {worst!r}")
        return own

    def accept_own(self, entry: dict[str, Any], line: bytes, charge: Charge | None,
                   own: OwnCharge | None = None) -> None:
        """Take an entry this process just wrote, without re-pricing what it priced a moment ago."""
        self.lines += 1
        self.last_seq = entry["seq"]
        self.last_hash = line_hash(line)
        self.entries.append(entry)
        if charge is not None and entry["kind"] == "release":
            self.state.commit(charge)
            if own is not None:
                self.own_noise.commit(own)
            self._unit_epsilon[charge.privacy_unit] = entry["epsilon"]
            self._phase_epsilon[(charge.privacy_unit, charge.phase)] = entry["phase_epsilon"]


def verify_ledger(path: Path, trusted_key: Ed25519PublicKey | None = None, *,
                  stop_at_first: bool = False) -> LedgerReplay:
    """Read and re-check a ledger file; inspect `.problems` (empty means it verified).

    stop_at_first skips re-pricing the rest once something failed (it only saves time).
    """
    replay = LedgerReplay(trusted_key)
    replay.feed_bytes(Path(path).read_bytes(), stop_at_first=stop_at_first)
    return replay


# The noise search's trials (does this plan fit this ledger's state?), shared by the ledgers of one process: sites
# with the same budget and history (an in-process consortium, ten or a hundred sites) ask the same ~10 questions,
# each a PLD build. Only the search is served from here; the multiplier it finds is priced afresh on the ledger's
# own state before it is returned, so a memo can change how fast a site calibrates, never what it may spend.
_SEARCH_TRIALS: dict[tuple, tuple[float, bool]] = {}
_SEARCH_TRIALS_KEPT = 4096


class SiteLedger:
    """The privacy ledger of one site; every DP release of every phase is charged here.

    Typical use, with the noise drawn only if the budget allows::

        ledger = SiteLedger(site_dir, "hospital-a", BudgetConfig(8.0, 1e-5, {"phase_a": .5, ...}))
        sigma = ledger.calibrate("phase_a", lambda s: [DpSgd(s, q, steps, clip)] * rounds)
        noisy, entry = ledger.release("phase_a", DpSgd(sigma, q, steps, clip), add_noise, round=r)
        # ...then send `noisy` (and `entry`, for the coordinator's countersigned copy)

    Several SiteLedger objects (threads, processes) may share a site directory: each operation
    takes a file lock and first reads what the others appended.
    """

    def __init__(
        self,
        site_dir: str | os.PathLike,
        site_id: str,
        budget: BudgetConfig | None = None,
        *,
        settings: AccountantSettings | None = None,
        run_id: str | None = None,
        recover_torn_tail: bool = False,
        start_over_with_existing_key: bool = False,
    ):
        if not isinstance(site_id, str) or not SITE_ID_PATTERN.match(site_id):
            raise ValueError(f"site_id must match {SITE_ID_PATTERN.pattern}, got {site_id!r}")
        self.site_dir = Path(site_dir)
        self.site_id = site_id
        self.path = self.site_dir / LEDGER_PATH
        self.key_path = self.site_dir / SITE_KEY_PATH
        self.run_id = run_id or uuid.uuid4().hex
        self._thread_lock = threading.Lock()
        self._size = 0
        self._broken: LedgerError | None = None  # once the file fails verification, every call fails
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if not self.path.exists():
                self._first_start(budget, settings, start_over_with_existing_key)
            else:
                self._key = load_or_create_private_key(self.key_path)
                self._replay = LedgerReplay(self._key.public_key())
            self._sync(recover_torn_tail)
        stored = self._replay
        if stored.site_id != site_id:
            raise LedgerConfigMismatch(f"{self.path} belongs to site {stored.site_id!r}, not {site_id!r}")
        if budget is not None and budget != stored.budget:
            raise LedgerConfigMismatch(
                f"{self.path} was started with budget {stored.budget.to_dict()}, but this run asks for "
                f"{budget.to_dict()}. A site's budget cannot change under an existing ledger; restore the "
                f"configuration, or start a new site ledger deliberately."
            )
        if settings is not None and settings != stored.settings:
            raise LedgerConfigMismatch(
                f"{self.path} uses accountant settings {stored.settings.to_dict()}, not {settings.to_dict()}"
            )

    # -- reading ---------------------------------------------------------------------------

    @property
    def budget(self) -> BudgetConfig:
        return self._replay.budget

    @property
    def settings(self) -> AccountantSettings:
        return self._replay.settings

    @property
    def public_key_path(self) -> Path:
        return Path(str(self.key_path) + ".pub")

    @property
    def key_fingerprint(self) -> str:
        return key_fingerprint(self._key.public_key())

    @property
    def open_entry(self) -> dict[str, Any]:
        """The first, signed entry (site key, budget); the coordinator needs it before any release."""
        return json.loads(json.dumps(self._replay.entries[0]))

    def entries(self) -> list[dict[str, Any]]:
        with self._locked():
            self._sync()
            return json.loads(json.dumps(self._replay.entries))

    def spent(self, privacy_unit: str = "patient-in-site", phase: str | None = None) -> Epsilons:
        """(pld, rdp) epsilon spent so far by `privacy_unit`, overall or in one phase (phase rdp: NaN)."""
        with self._locked():
            self._sync()
            return self._replay.state.spent(privacy_unit, phase)

    def remaining(self, privacy_unit: str = "patient-in-site", phase: str | None = None) -> float:
        """PLD epsilon still available overall or in one phase (the two limits apply together)."""
        with self._locked():
            self._sync()
            return self._replay.state.remaining(privacy_unit, phase)

    def release_of(self, phase: str, round: int, run_id: str | None = None,
                   privacy_unit: str = "patient-in-site") -> dict[str, Any] | None:
        """The release entry of this round of `run_id` (default: this ledger's run), or None if none was made."""
        with self._locked():
            self._sync()
            found = self._release_of(phase, round, run_id or self.run_id, privacy_unit)
            return json.loads(json.dumps(found)) if found is not None else None

    def price(self, phase: str, mechanism: Mechanism | Iterable[Mechanism], *, rdp: bool = True) -> Charge:
        """What `mechanism` (or a planned sequence) would cost now; records nothing (rdp=False: PLD only, faster)."""
        with self._locked():
            self._sync()
            return self._replay.state.price(phase, mechanism, rdp=rdp)

    def calibrate(
        self,
        phase: str,
        plan: Callable[[float], Mechanism | Iterable[Mechanism]],
        *,
        tolerance: float = 1e-3,
        phase_cap: float | None = None,
        near: float | None = None,
    ) -> float:
        """The smallest noise multiplier s for which everything in `plan(s)` fits what is left.

        `plan` maps a noise multiplier to the releases the phase will make with it, in the
        order they will be recorded, e.g. ``lambda s: [DpSgd(s, q, steps_per_round, C)] * rounds``;
        pricing the same sequence the ledger will later compose avoids refusals at the last
        round from composing per round instead of all at once. `phase_cap`: a lower cap on the
        phase's cumulative epsilon for this plan (a run that asked for less than the budget allows).
        `near`: where the answer is expected (e.g. the coordinator's estimate); it changes how many prices the
        search takes, never what it finds (accountant.smallest_noise_multiplier).
        """
        def planned(sigma: float) -> list[Mechanism]:
            releases = plan(sigma)
            return [releases] if hasattr(releases, "to_dp_event") else list(releases)

        screened_from = math.inf  # every multiplier >= this passed the RDP screen

        def slack(sigma: float) -> float:
            nonlocal screened_from
            mechanisms = merge_repeats(planned(sigma))
            # epsilon only falls as noise grows, so the (costly) RDP screen is needed only below
            # the smallest multiplier it has already passed
            screen = sigma < screened_from
            key = (state.price_key(phase, mechanisms), screen, phase_cap)
            if key not in _SEARCH_TRIALS:
                charge = state.price(phase, mechanisms, rdp=False, screen=screen)
                if len(_SEARCH_TRIALS) >= _SEARCH_TRIALS_KEPT:
                    _SEARCH_TRIALS.clear()
                _SEARCH_TRIALS[key] = (left_after(charge), charge.priced_by_pld)
            left, priced_by_pld = _SEARCH_TRIALS[key]
            if screen and priced_by_pld:
                screened_from = sigma
            return left

        def left_after(charge: Charge) -> float:
            """The charge's margin, under this plan's own phase cap too (>= 0: it fits)."""
            if phase_cap is None:
                return charge.margin
            return min(charge.margin, phase_cap - charge.phase_after.pld)

        with self._locked():
            self._sync()
            state = self._replay.state
            # Search on the plan with runs of identical releases merged (one composition instead
            # of one per round), then confirm on the plan as it will really be composed.
            sigma = smallest_noise_multiplier(slack, tolerance, near)
            for _ in range(100):
                if left_after(state.price(phase, planned(sigma), rdp=False, screen=False)) >= 0:
                    return sigma
                sigma *= 1 + tolerance
            raise CalibrationError(f"no noise multiplier near {sigma:.4g} fits the plan for phase {phase!r}")

    # -- charging --------------------------------------------------------------------------

    def check(self, phase: str, mechanism: Mechanism, *, round: int | None = None, run_id: str | None = None,
              population_size: int | None = None, extra: dict[str, Any] | None = None) -> Charge:
        """Price a release before any noise is drawn; if it does not fit, record the refusal and raise."""
        with self._locked():
            self._sync()
            return self._charge_or_refuse(phase, mechanism, round, run_id, population_size, extra)

    def record(self, phase: str, mechanism: Mechanism, *, round: int | None = None, run_id: str | None = None,
               population_size: int | None = None, noise_source: str = UNSPECIFIED_NOISE_SOURCE,
               extra: dict[str, Any] | None = None, noise: NoiseSharing = SITE_NOISE) -> dict[str, Any]:
        """Append the signed release entry (re-checking the budget) and return it, ready to ship.

        Call it after the noise is drawn and before anything is sent; if it raises, send nothing.
        `noise`: how the release shares its noise (the site drew `noise.own_stddev(mechanism)`).
        """
        with self._locked():
            self._sync()
            charge = self._charge_or_refuse(phase, mechanism, round, run_id, population_size, extra)
            return self._append_release(charge, round, run_id, population_size, noise_source, extra, noise)

    def release(self, phase: str, mechanism: Mechanism, draw_noise: Callable[[], T], *, round: int | None = None,
                run_id: str | None = None, population_size: int | None = None,
                noise_source: str = UNSPECIFIED_NOISE_SOURCE, extra: dict[str, Any] | None = None,
                noise: NoiseSharing = SITE_NOISE) -> tuple[T, dict[str, Any]]:
        """check -> draw_noise() -> record, under one lock; returns (draw_noise's result, entry).

        If the budget does not allow it, draw_noise is never called. If draw_noise raises,
        nothing is recorded (nothing was released). `noise`: as in `record`; the budget is enforced on
        `mechanism` (the relied-on noise), the entry also states the worst case of the site's own noise.
        """
        with self._locked():
            self._sync()
            charge = self._charge_or_refuse(phase, mechanism, round, run_id, population_size, extra)
            noisy = draw_noise()
            return noisy, self._append_release(charge, round, run_id, population_size, noise_source, extra, noise)

    def refuse_request(self, phase: str | None, request: dict[str, Any], limit: str, reason: str, *,
                       round: int | None = None, run_id: str | None = None) -> dict[str, Any]:
        """Record a request refused by the site's policy (nothing was computed or drawn) and return the entry."""
        _check_fields(round, None, request)
        with self._locked():
            self._sync()
            return self._append({"kind": "policy_refusal", "phase": phase, "round": round, "request": request,
                                 "limit": limit, "reason": reason}, run_id=run_id, charge=None)

    # -- internals -------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _first_start(self, budget: BudgetConfig | None, settings: AccountantSettings | None,
                     start_over_with_existing_key: bool) -> None:
        """Create the key and the ledger's open entry together; refuse a new ledger under an old key.

        The marker file covers a crash between writing the key and the open entry: the next start
        finishes that first start instead of taking it for a deleted ledger.
        """
        marker = self.path.with_suffix(".starting")
        if self.key_path.exists() and not marker.exists() and not start_over_with_existing_key:
            raise LedgerMissing(self.path, self.key_path)
        if budget is None:  # a reader must not leave a key behind that a first start would then refuse
            raise LedgerError(f"no privacy ledger at {self.path} yet; a BudgetConfig is needed to start one")
        write_atomic(marker, b"the site key and the ledger's open entry are being created\n")
        self._key = load_or_create_private_key(self.key_path)
        self._replay = LedgerReplay(self._key.public_key())
        self._create(budget, settings or AccountantSettings())
        marker.unlink()

    def _create(self, budget: BudgetConfig, settings: AccountantSettings) -> None:
        public = self._key.public_key()
        entry = {
            "seq": 0, "kind": "open", "format": LEDGER_FORMAT, "time": _utc_now(),
            "site_id": self.site_id, "run_id": self.run_id, "prev_hash": GENESIS_PREV_HASH,
            "public_key": public_key_b64(public), "key_fingerprint": key_fingerprint(public),
            "budget": budget.to_dict(), "accountant_settings": settings.to_dict(), "accountant": ACCOUNTANT,
        }
        # Write-then-rename, so a crash can never leave a half-written first entry.
        write_atomic(self.path, self._signed_line(entry) + b"\n")

    def _sync(self, recover_torn_tail: bool = False) -> None:
        if self._broken is not None:
            raise self._broken
        size = self.path.stat().st_size
        if size < self._size:
            self._broken = LedgerConflict(f"{self.path} shrank from {self._size} to {size} bytes while in use")
            raise self._broken
        if size == self._size:
            return
        with open(self.path, "rb") as f:
            f.seek(self._size)
            data = f.read(size - self._size)
        known = len(self._replay.problems)
        self._replay.feed_bytes(data)
        new = self._replay.problems[known:]
        if not new:
            self._size = size
            return
        torn_only = len(new) == 1 and self._replay.torn_tail is not None
        if torn_only and recover_torn_tail:
            self._replay.problems.pop()
            self._size = size - len(self._replay.torn_tail)
            self._recover_torn_tail()
            return
        self._broken = (LedgerTornTail if torn_only else LedgerCorrupted)(self.path, new)
        raise self._broken

    def _recover_torn_tail(self) -> None:
        torn, self._replay.torn_tail = self._replay.torn_tail, None
        digest = hashlib.sha256(torn).hexdigest()
        side_file = self.path.with_name(f"{self.path.name}.torn-{self._size}-{digest[:12]}")
        write_atomic(side_file, torn, exclusive=True)
        os.truncate(self.path, self._size)
        self._append({
            "kind": "recovery", "torn_bytes": len(torn), "torn_sha256": digest, "torn_saved_as": side_file.name,
            "note": "a torn last line (an interrupted write) was removed at the operator's request; "
                    "the release it described was never sent",
        }, run_id=None, charge=None)

    def _charge_or_refuse(self, phase, mechanism, round, run_id, population_size, extra) -> Charge:
        _check_fields(round, population_size, extra)
        unit = getattr(mechanism, "privacy_unit", None)
        if round is not None and unit is not None:
            done = self._release_of(phase, round, run_id or self.run_id, unit)
            if done is not None:
                raise AlreadyReleased(self.site_id, done)
        charge = self._replay.state.price(phase, mechanism)
        if charge.fits:
            return charge
        refused = BudgetExhausted(self.site_id, charge)
        self._append({
            **self._release_fields(charge, round, population_size, extra),
            "kind": "refusal",
            "epsilon": charge.before.pld, "epsilon_rdp": charge.before.rdp,
            "phase_epsilon": charge.phase_before.pld,
            "requested": {
                "epsilon": _finite_or_none(charge.after.pld), "epsilon_rdp": _finite_or_none(charge.after.rdp),
                "phase_epsilon": _finite_or_none(charge.phase_after.pld),
            },
            "limit": charge.exceeded,
            "cap": charge.phase_cap if charge.exceeded == "phase" else charge.total_cap,
            "reason": str(refused),
        }, run_id=run_id, charge=None)
        raise refused

    def _release_of(self, phase: str, round: int, run_id: str, privacy_unit: str) -> dict[str, Any] | None:
        for entry in reversed(self._replay.entries):
            if (entry.get("kind") == "release" and entry.get("phase") == phase and entry.get("round") == round
                    and entry.get("run_id") == run_id and entry.get("privacy_unit") == privacy_unit):
                return entry
        return None

    def _append_release(self, charge, round, run_id, population_size, noise_source, extra,
                        noise: NoiseSharing) -> dict[str, Any]:
        if not isinstance(noise_source, str) or not noise_source:
            raise ValueError("noise_source must be a non-empty description of the random-number source")
        own = self._replay.own_noise.price(charge.mechanism, noise)
        shared = {"noise": noise.entry_block(charge.mechanism, own.composition.epsilon(charge.delta).pld)
                  } if noise.shared else {}
        return self._append({
            **self._release_fields(charge, round, population_size, extra),
            "kind": "release",
            "epsilon": charge.after.pld, "epsilon_rdp": charge.after.rdp,
            "phase_epsilon": charge.phase_after.pld,
            "noise_source": noise_source, **shared,
        }, run_id=run_id, charge=charge, own=own)

    @staticmethod
    def _release_fields(charge: Charge, round, population_size, extra) -> dict[str, Any]:
        return {
            "phase": charge.phase, "round": round, "privacy_unit": charge.privacy_unit,
            "mechanism": charge.mechanism.to_dict(), "delta": charge.delta, "accountant": ACCOUNTANT,
            "population_size": population_size, "extra": extra or {},
        }

    def _signed_line(self, entry: dict[str, Any]) -> bytes:
        entry["signature"] = sign(self._key, SITE_ENTRY_DOMAIN, canonical_json(entry))
        return canonical_json(entry)

    def _append(self, fields: dict[str, Any], run_id: str | None, charge: Charge | None,
                own: OwnCharge | None = None) -> dict[str, Any]:
        entry = {
            **fields, "seq": self._replay.lines, "time": _utc_now(), "site_id": self.site_id,
            "run_id": run_id or self.run_id, "prev_hash": self._replay.last_hash,
        }
        line = self._signed_line(entry)
        # One fsynced append; on a full disk the partial line is cut off again and the error raised,
        # so the caller sends nothing and the ledger still verifies.
        self._size = append_durably(self.path, line + b"\n")
        self._replay.accept_own(entry, line, charge, own)
        return json.loads(line)


def _check_fields(round: Any, population_size: Any, extra: Any) -> None:
    # Validated before anything is written, so a bad argument never leaves half an entry behind.
    if round is not None and (isinstance(round, bool) or not isinstance(round, int) or round < 0):
        raise ValueError(f"round must be an integer >= 0 or None, got {round!r}")
    if population_size is not None and (
        isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 1
    ):
        raise ValueError(f"population_size must be an integer >= 1 or None, got {population_size!r}")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError("extra must be a dict of JSON values")
        try:
            canonical_json(extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must hold only finite JSON values: {exc}") from None
