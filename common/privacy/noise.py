"""Gaussian noise drawn from the operating system's CSPRNG, for the releases PMLM adds noise to itself.

A seeded statistical generator (numpy's PCG64, torch's Mersenne Twister) is predictable from enough of its
output; the DP guarantee assumes nobody can predict the noise. `SecureNormal` turns `os.urandom` bytes into
standard normals (Box-Muller on 53-bit uniforms) and has numpy's `Generator.normal` signature, so a test can
still pass a seeded numpy generator where it needs repeatable draws.
"""

from __future__ import annotations

import os

import numpy as np

NOISE_SOURCE = "os.urandom (the OS CSPRNG), Box-Muller on 53-bit uniforms, float64"


class SecureNormal:
    """`normal(loc, scale, size)` with every bit from the OS CSPRNG; holds no state that could be replayed."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size=None) -> np.ndarray | float:
        shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
        n = int(np.prod(shape, dtype=np.int64))
        pairs = (n + 1) // 2
        bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs) >> np.uint64(11)
        u1 = (bits[0].astype(np.float64) + 1.0) / 2.0 ** 53  # in (0, 1]: log never sees 0
        u2 = bits[1].astype(np.float64) / 2.0 ** 53
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
        out = loc + scale * z.reshape(shape)
        return float(out) if size is None else out


def noise_source_of(rng) -> str:
    """What the ledger says about the generator that drew a release's noise."""
    if isinstance(rng, SecureNormal):
        return NOISE_SOURCE
    return f"{type(rng).__module__}.{type(rng).__name__} supplied by the caller (not a CSPRNG: tests, benchmarks)"
