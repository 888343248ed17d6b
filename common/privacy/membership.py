"""Membership inference against a site's released artifacts, held against what their (ε, δ) allows.

A membership-inference attack gets one patient's record and a released artifact and guesses whether
she was in the data that built it. Its *advantage* is TPR − FPR: how much more often it says
"member" for members than for non-members. For an (ε, δ)-DP release, no attack of any kind can do
better than (e^ε − 1 + 2δ) / (e^ε + 1) (Kairouz et al. 2015; Humphries et al. 2023). An audit
therefore runs concrete attacks on the real artifact with the site's real patients and checks:

* measured advantage above the bound (with confidence) means the accounting or the implementation
  is wrong: the release leaks more than the ledger claims;
* measured advantage below the bound is what DP predicts; it is a *lower* bound on the leakage
  of this attack only (stronger attacks, e.g. with shadow models, may find more), never a proof.

The attacks (scores; higher means "more likely a member"):

* **model, loss threshold** (Yeom et al. 2018): minus her mean loss under the released model.
  Training lowers the loss of the patients it saw; DP-SGD limits how much any one can move it.
* **model, calibrated loss**: the same, minus her loss under an untrained model of the same shape
  (a public, data-independent reference). That removes most of how hard her record is in itself
  (chiefly how many care events follow each visit), so what is left is what training did for her.
* **peer profiles, contribution alignment**: phase B adds her next-horizon events (a 0/1 row) to
  the histogram of the prototype her embedding is nearest to. The attacker knows her record and the
  released model, so she can find that prototype and ask whether its released rates are raised
  exactly where her own events are: the mean, over her events, of (prototype rate − the profiles'
  overall rate). A member's own row adds 1/n to each of those rates; a non-member's does not.
  This is the released-artifact counterpart of what DP bounds (the profile with and without her).

The advantage is the best over all thresholds, measured in-sample, so it is optimistic; two
resampling figures keep it honest: a bootstrap confidence interval, and the advantage the same
procedure finds when member labels are shuffled (what "no leakage at all" looks like at this
sample size). Everything here works on scores and counts: nothing per patient is kept or written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pmlm.common.privacy.accountant import AccountantSettings, compose_epsilon, merge_repeats
from pmlm.common.privacy.events import mechanism_from_dict

FORMAT = "pmlm-membership-audit/1"
RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_GROUP = 5  # fewer members or non-members than this: no attack is measured


# -- the DP bound ------------------------------------------------------------------------------------

def advantage_bound(epsilon: float, delta: float) -> float:
    """The largest membership advantage any attack can have on an (ε, δ)-DP release."""
    if not math.isfinite(epsilon) or epsilon > 700:  # exp overflows; the bound is 1 to double precision
        return 1.0
    return min(1.0, (math.expm1(epsilon) + 2 * delta) / (math.exp(epsilon) + 1))


def epsilon_lower_bound(advantage: float, delta: float) -> float:
    """The smallest ε whose bound still allows `advantage` (the bound solved for ε)."""
    if advantage <= delta:
        return 0.0
    if advantage >= 1:
        return math.inf
    return math.log((1 + advantage - 2 * delta) / (1 - advantage))


# -- attack statistics ---------------------------------------------------------------------------------

@dataclass
class AttackResult:
    attack: str
    members: int
    non_members: int
    advantage: float  # max over thresholds of TPR - FPR, in-sample
    advantage_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    null_advantage: float  # 95th percentile of the advantage with shuffled labels
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)


def _sorted_weights(member_scores: np.ndarray, non_member_scores: np.ndarray):
    """Scores in descending order, which positions are members, and where each run of equal scores ends."""
    scores = np.concatenate([member_scores, non_member_scores]).astype(float)
    is_member = np.concatenate([np.ones(len(member_scores), bool), np.zeros(len(non_member_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # a threshold may not split a tie
    return is_member, ends, order


def _advantages(weights: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Rows of per-position weights (+1/m for a member, -1/n for a non-member, in score order) -> each
    row's max over thresholds of TPR - FPR (0 for the threshold above every score)."""
    return np.maximum(np.cumsum(weights, axis=-1)[..., ends].max(axis=-1), 0.0)


def measure(attack: str, member_scores, non_member_scores, *, resamples: int = RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> AttackResult:
    """Advantage and AUC of predicting "member" for high scores, with bootstrap intervals and a shuffled null."""
    m_scores, n_scores = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    m, n = len(m_scores), len(n_scores)
    if m < MIN_GROUP or n < MIN_GROUP:
        raise ValueError(f"{attack}: needs at least {MIN_GROUP} members and non-members, got {m} and {n}")
    rng = np.random.default_rng(seed)
    is_member, ends, order = _sorted_weights(m_scores, n_scores)
    unit = np.where(is_member, 1.0 / m, -1.0 / n)
    # Bootstrap: resample members and non-members separately; a resample is a count per patient.
    counts = np.concatenate([rng.multinomial(m, np.full(m, 1 / m), size=resamples),
                             rng.multinomial(n, np.full(n, 1 / n), size=resamples)], axis=1)
    boot_adv = _advantages(counts[:, order] * unit, ends)
    # AUC = P(member score > non-member score) + P(tie) / 2, over the pairs a resample weights.
    pair = (m_scores[:, None] > n_scores[None, :]) + 0.5 * (m_scores[:, None] == n_scores[None, :])
    auc = float(pair.mean())
    boot_auc = np.einsum("bi,ij,bj->b", counts[:, :m], pair, counts[:, m:]) / (m * n)
    # Null: the same labels shuffled over the same scores.
    shuffled = rng.permuted(np.tile(is_member, (resamples, 1)), axis=1)
    null = _advantages(np.where(shuffled, 1.0 / m, -1.0 / n), ends)
    tail = (1 - confidence) / 2
    return AttackResult(
        attack=attack, members=m, non_members=n,
        advantage=float(_advantages(unit, ends)),
        advantage_ci=(float(np.quantile(boot_adv, tail)), float(np.quantile(boot_adv, 1 - tail))),
        auc=auc, auc_ci=(float(np.quantile(boot_auc, tail)), float(np.quantile(boot_auc, 1 - tail))),
        null_advantage=float(np.quantile(null, 0.95)), confidence=confidence)


def verdict(result: dict, bound: float | None) -> tuple[str, bool]:
    """(what an auditor should read from one attack, whether it is consistent with the ledger)."""
    low = result["advantage_ci"][0]
    chance = result["advantage"] <= result["null_advantage"]
    seen = "indistinguishable from chance at this sample size" if chance else "leakage detected"
    if bound is None:
        return f"no DP guarantee for this artifact; {seen}", True
    if low > bound:
        return "EXCEEDS the DP bound: the release leaks more than its ledger entry allows", False
    if result["advantage"] > bound:
        return f"above the bound but within sampling error (CI {low:.3f} to {result['advantage_ci'][1]:.3f})", True
    return f"within the bound; {seen}", True


# -- attack scores -------------------------------------------------------------------------------------

def point_losses(model, history, point, targets, batch_size: int = 256) -> np.ndarray:
    """The training loss of each prediction point: summed binary cross-entropy over the concepts."""
    import torch  # here, so that `pmlm audit report` (which only needs the statistics) starts fast
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        out = [F.binary_cross_entropy_with_logits(model(history[i:i + batch_size], point[i:i + batch_size]),
                                                  targets[i:i + batch_size], reduction="none").sum(-1)
               for i in range(0, len(point), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def mean_by_group(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of `values` per group id 0..n_groups-1 (one patient's prediction points -> her loss)."""
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    return sums / np.maximum(np.bincount(groups, minlength=n_groups), 1)


def profile_alignment(prototype: np.ndarray, targets: np.ndarray, rates: np.ndarray, counts: np.ndarray,
                      suppressed: np.ndarray) -> np.ndarray:
    """Per patient: how far her prototype's released rates sit above the profiles' overall rates, on
    average over her own next-horizon events. 0 when her prototype is suppressed (nothing released)
    or she had no events there.

    prototype (P,): the prototype each patient's embedding is nearest to; targets (P, V) 0/1 rows
    as phase B caps them; rates (k, V), counts (k,), suppressed (k,) as released.
    """
    visible = ~suppressed
    weights = np.where(visible, np.maximum(counts, 0.0), 0.0)
    overall = weights @ rates / weights.sum() if weights.sum() > 0 else np.zeros(rates.shape[1])
    excess = (rates - overall)[prototype]  # (P, V)
    events = targets.sum(axis=1)
    score = (excess * targets).sum(axis=1) / np.maximum(events, 1)
    return np.where(visible[prototype] & (events > 0), score, 0.0)


# -- tying an artifact to its ledger releases ----------------------------------------------------------

def tied_releases(entries: list[dict], wanted: list[dict]) -> tuple[list[dict], list[str]]:
    """The ledger's release entries named by `wanted` ({seq, signature} each), and one problem for each
    that the ledger does not hold exactly as named."""
    by_seq = {e.get("seq"): e for e in entries if e.get("kind") == "release"}
    found, problems = [], []
    for item in wanted:
        entry = by_seq.get(item.get("seq"))
        if entry is None or entry.get("signature") != item.get("signature"):
            problems.append(f"ledger release #{item.get('seq')} is not in the ledger as recorded")
        else:
            found.append(entry)
    return found, problems


def composed_epsilon(releases: list[dict], delta: float, settings: AccountantSettings | None = None) -> float:
    """ε at `delta` of these ledger releases composed: the guarantee of an artifact built from them."""
    mechanisms = merge_repeats([mechanism_from_dict(e["mechanism"]) for e in releases])
    return compose_epsilon(mechanisms, delta, settings).pld
