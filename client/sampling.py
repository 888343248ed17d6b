"""Who takes part in a DP release, decided so that one patient's presence changes nobody else's part.

A release charged with sensitivity = clip is only DP if adding or removing one patient changes the released
sum by at most her own clipped contribution. A fixed-size shuffle with a public seed breaks that: one more
patient shifts who else is drawn (12 of 40 participants changed in a test) and the prompts drawn for them.
Here each patient's part depends only on her own id and a secret key of the site:

- she takes part in a round with probability `rate` (Poisson sampling, accounted as such: the release is a
  Poisson-subsampled Gaussian, common/privacy/events.py DpSgd with one step), by a keyed PRF of
  (run, round, patient) — the coordinator cannot predict or steer who is in;
- everything random about her part (which of her points, which prompts are drawn) comes from a generator
  seeded by the same PRF, so it is the same whoever else is in the site.

The key (32 bytes from the OS's CSPRNG, SITE_DIR/keys/sampling.key, mode 0600) never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pmlm.common.site_layout import SAMPLING_KEY_PATH



def site_sampling_key(site_dir: Path) -> bytes:
    """The site's secret sampling key, created on first use (never sent, never logged)."""
    path = Path(site_dir) / SAMPLING_KEY_PATH
    if path.is_file():
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path} holds {len(key)} bytes, not a 32-byte sampling key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of the site made it first: use that one
        return site_sampling_key(site_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def keyed_uniform(key: bytes, *parts: object) -> float:
    """A number in [0, 1) that only the key holder can compute, fixed by `parts`."""
    return keyed_seed(key, *parts) / 2.0 ** 64


def keyed_seed(key: bytes, *parts: object) -> int:
    """A 64-bit seed from HMAC-SHA256(key, parts): independent across parts, unpredictable without the key."""
    message = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "big")


def takes_part(key: bytes, rate: float, run_id: str, round: int, patient_id: str) -> bool:
    """Poisson sampling: she is in this round's release with probability `rate`, independently of everyone."""
    return keyed_uniform(key, "take-part", run_id, round, patient_id) < rate
