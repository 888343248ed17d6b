"""Noisy releases kept at the site, so that a re-executed round resends its release instead of paying again.

A coordinator may ask a site for the same round twice: a secure sum that halted after the sites had
computed their vectors is retried, a restarted server re-sends a round. The ledger charges a round once
(`AlreadyReleased`); `release_once` turns that into an answer: the first time it checks the budget, draws
the noise, keeps the noisy array under ``SITE/ledger/releases/`` and records the entry, all under the
ledger's lock, before anything is sent. Asked again for the same (run, phase, round), it returns the kept
array and its entry. Sending the same noisy values again is post-processing of one release: it costs no
privacy, and nothing new is drawn.

A repeat must carry the same request (e.g. the same centroids or policy weights, by digest): a different
request for a round already released is refused, since answering it would need a fresh release.

A release made for a secure-aggregation group is re-sent only to the same group: re-sent to a smaller one, the
coordinator could subtract the two totals and read the missing sites' vectors. Another group gets
`GroupChanged` (the round fails and says why) unless the caller allows it (the site's policy accepts per-site
DP alone for that case).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pmlm.common.atomic import write_atomic
from pmlm.common.privacy.events import Mechanism
from pmlm.common.privacy.ledger import AlreadyReleased, LedgerError, SiteLedger
from pmlm.common.privacy.shared_noise import SITE_NOISE, NoiseSharing
from pmlm.common.site_layout import KEPT_DIR



class GroupChanged(LedgerError):
    """A kept release was asked for again by another secure-aggregation group than the one it was made for."""

    limit = "smaller_group_retry"


def request_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the arrays a request carried (shape, dtype and bytes of each)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def kept_path(ledger: SiteLedger, phase: str, round: int, run_id: str) -> Path:
    return ledger.site_dir / KEPT_DIR / f"{run_id}-{phase}-r{round:04d}.npz"


def release_once(ledger: SiteLedger, phase: str, mechanism: Mechanism, draw_noise: Callable[[], np.ndarray], *,
                 round: int, run_id: str, request: str, population_size: int | None = None,
                 noise_source: str, extra: dict[str, Any] | None = None,
                 group: tuple[int, ...] | None = None, other_group_allowed: bool = False,
                 noise: NoiseSharing = SITE_NOISE) -> tuple[np.ndarray, dict[str, Any]]:
    """`SiteLedger.release` for a round that may be asked for again; returns (noisy array, ledger entry).

    `request`: `request_digest` of what the coordinator sent for this round. `group`: the secure-aggregation
    group it goes to (None: a plain release); a repeat for another group raises GroupChanged unless
    `other_group_allowed`. `noise`: how the release shares its noise (SiteLedger.release); a kept release
    re-sent keeps the entry it was made with.
    """
    group_text = "plain" if group is None else ",".join(str(n) for n in sorted(group))
    path = kept_path(ledger, phase, round, run_id)

    def draw_and_keep() -> np.ndarray:
        noisy = np.asarray(draw_noise())
        kept = io.BytesIO()
        np.savez(kept, values=noisy, request=np.array(request), group=np.array(group_text))
        write_atomic(path, kept.getvalue())  # kept before the entry is recorded, both before anything is sent
        return noisy

    try:
        return ledger.release(phase, mechanism, draw_and_keep, round=round, run_id=run_id,
                              population_size=population_size, noise_source=noise_source, extra=extra,
                              noise=noise)
    except AlreadyReleased as already:
        if not path.is_file():  # released before releases were kept, or the file was removed
            raise
        with np.load(path) as kept:
            if str(kept["request"]) != request:
                raise AlreadyReleased(ledger.site_id, already.entry,
                                      "asked again with a different request") from None
            made_for = str(kept["group"]) if "group" in kept.files else "plain"
            if group is None and "noise" in already.entry:  # whatever the policy says now
                raise GroupChanged(
                    f"round {round} of {phase} (run {run_id}) was released at site {ledger.site_id} with its noise "
                    f"shared across a secure sum (the site added only σ/√k); it is never re-sent unmasked") from None
            if made_for != group_text and not other_group_allowed:
                raise GroupChanged(
                    f"smaller_group_retry refused at site {ledger.site_id}: round {round} of {phase} (run {run_id}) "
                    f"was released for the secure-sum group [{made_for}], asked for again by [{group_text}]; "
                    f"re-sent to another group, the totals' difference would reveal sites' vectors (a site's "
                    f"policy can accept per-site DP alone for this case)") from None
            return kept["values"], already.entry
