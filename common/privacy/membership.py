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

The usual figure, the best threshold's TPR − FPR on the patients it was chosen on, is optimistic; it
comes with its chance level (the same figure with member labels shuffled). The verdict rests on a
held-out advantage instead (thresholds chosen on one half of the patients, measured on the other)
and its confidence interval; the AUC comes with a bootstrap interval (see `measure`). Everything
here works on scores and counts: nothing per patient is kept or written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

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
    advantage: float  # best threshold's TPR - FPR, chosen and measured on the same patients: optimistic
    null_advantage: float  # 95th percentile of that figure with member labels shuffled: its chance level
    held_out_advantage: float  # threshold chosen on one half of the patients, TPR - FPR on the other half
    advantage_ci: tuple[float, float]  # interval of the held-out advantage
    auc: float
    auc_ci: tuple[float, float]  # bootstrap
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)


def _ranked(member_scores: np.ndarray, non_member_scores: np.ndarray):
    """Scores in descending order, which of them are members', where each run of equal scores ends
    (a threshold cannot split a tie), and the order that sorted them."""
    scores = np.concatenate([member_scores, non_member_scores]).astype(float)
    is_member = np.concatenate([np.ones(len(member_scores), bool), np.zeros(len(non_member_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    return scores, is_member, ends, order


def _gains(weights: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Integer weights in score order (n per member, -m per non-member, times how often a resample holds
    her) -> m*n*(TPR - FPR) at each threshold. Integers keep it exact: a perfect attack is 1, not 1 + 2e-16."""
    return np.cumsum(weights, axis=-1)[..., ends]


def best_threshold(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """The score at or above which saying "member" gives the best TPR - FPR (inf when nothing beats 0)."""
    scores, is_member, ends, _ = _ranked(member_scores, non_member_scores)
    gains = _gains(np.where(is_member, len(non_member_scores), -len(member_scores)), ends)
    best = int(np.argmax(gains))
    return float(scores[ends[best]]) if gains[best] > 0 else math.inf


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def held_out_advantage(member_scores: np.ndarray, non_member_scores: np.ndarray, rng: np.random.Generator,
                       confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """TPR - FPR at thresholds chosen on held-out halves, with Newcombe's interval for a difference of
    proportions. Each half is scored at the best threshold of the other, so the choice cannot flatter
    the result: the estimate is unbiased for what those thresholds achieve, which is at most the best
    possible advantage, and so its lower end is an honest lower bound of the attack's advantage."""
    m, n = len(member_scores), len(non_member_scores)
    fold_m, fold_n = rng.permutation(m) % 2, rng.permutation(n) % 2
    true_pos = false_pos = 0
    for k in (0, 1):
        t = best_threshold(member_scores[fold_m != k], non_member_scores[fold_n != k])
        true_pos += int((member_scores[fold_m == k] >= t).sum())
        false_pos += int((non_member_scores[fold_n == k] >= t).sum())
    z = float(_normal_quantile(0.5 + confidence / 2))
    tpr, fpr = true_pos / m, false_pos / n
    (tpr_low, tpr_high), (fpr_low, fpr_high) = _wilson(true_pos, m, z), _wilson(false_pos, n, z)
    return tpr - fpr, (tpr - fpr - math.hypot(tpr - tpr_low, fpr_high - fpr),
                       tpr - fpr + math.hypot(tpr_high - tpr, fpr - fpr_low))


def _normal_quantile(p: float) -> float:
    return NormalDist().inv_cdf(p)


def measure(attack: str, member_scores, non_member_scores, *, resamples: int = RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> AttackResult:
    """Advantage (in-sample with its chance level, and held out with an interval) and AUC (with a bootstrap
    interval) of saying "member" for high scores.

    Why two advantages: the best threshold's TPR - FPR on the same patients it was chosen on is the usual
    figure, but biased upward (on pure noise it reads 0.1 to 0.3 at a few dozen patients, the chance level
    shows how much); bootstrapping it does not fix that (its resamples are biased further: a 95% interval
    covered the truth about 80% of the time in a simulation). The held-out advantage has no such bias, so
    the verdict rests on its interval.
    """
    m_scores, n_scores = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    m, n = len(m_scores), len(n_scores)
    if m < MIN_GROUP or n < MIN_GROUP:
        raise ValueError(f"{attack}: needs at least {MIN_GROUP} members and non-members, got {m} and {n}")
    rng = np.random.default_rng(seed)
    _, is_member, ends, order = _ranked(m_scores, n_scores)
    advantage = max(int(_gains(np.where(is_member, n, -m), ends).max()), 0) / (m * n)
    shuffled = rng.permuted(np.tile(is_member, (resamples, 1)), axis=1)
    null = np.maximum(_gains(np.where(shuffled, n, -m), ends).max(axis=-1), 0) / (m * n)
    held_out, interval = held_out_advantage(m_scores, n_scores, rng, confidence)
    # AUC = P(member score > non-member score) + P(tie) / 2; a bootstrap resample (members and
    # non-members separately) weights each pair by how often it holds the two.
    pair = (m_scores[:, None] > n_scores[None, :]) + 0.5 * (m_scores[:, None] == n_scores[None, :])
    counts_m = rng.multinomial(m, np.full(m, 1 / m), size=resamples)
    counts_n = rng.multinomial(n, np.full(n, 1 / n), size=resamples)
    boot_auc = np.einsum("bi,ij,bj->b", counts_m, pair, counts_n) / (m * n)
    tail = (1 - confidence) / 2
    return AttackResult(
        attack=attack, members=m, non_members=n, advantage=advantage, null_advantage=float(np.quantile(null, 0.95)),
        held_out_advantage=held_out, advantage_ci=(max(interval[0], -1.0), min(interval[1], 1.0)),
        auc=float(pair.mean()), auc_ci=(float(np.quantile(boot_auc, tail)), float(np.quantile(boot_auc, 1 - tail))),
        confidence=confidence)


def verdict(result: dict, bound: float | None) -> tuple[str, bool]:
    """(what an auditor should read from one attack, whether it is consistent with the ledger).

    Both rest on the held-out advantage: leakage is detected when its interval excludes 0, and the
    release exceeds its bound only when the interval's lower end is above the bound."""
    low, high = result["advantage_ci"]
    seen = "leakage detected" if low > 0 else "no leakage detected at this sample size"
    if bound is None:
        return f"no DP guarantee for this artifact; {seen}", True
    if low > bound:
        return "EXCEEDS the DP bound: the release leaks more than its ledger entry allows", False
    if result["held_out_advantage"] > bound:
        return f"above the bound but within sampling error (interval {low:.3f} to {high:.3f})", True
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
