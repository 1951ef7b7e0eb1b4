"""Integer noise for DP in CrypTen's fixed-point encoding, drawn jointly by the parties.

Each party draws a share of the noise from a cryptographically secure generator
and adds it to its own arithmetic share of the value, in ring units (2^-16),
just before the reveal: no communication, and the revealed value carries the sum
of all parties' shares while each party knows only its own.

The noise is Skellam: the difference of two Poisson draws. Skellam variables
are integers and the sum of Skellams is Skellam, so the honest parties' shares
add up to exactly the mechanism the accountant assumes. With n parties and a
collusion threshold t (colluders pool their own shares and subtract them; the
receivers count among them), each share has variance sigma^2 / (n - t), so the
n - t honest shares alone reach the target sigma^2.
"""

from __future__ import annotations

import secrets

import numpy as np
import randomgen
import torch


def secure_generator() -> np.random.Generator:
    """numpy's Generator over ChaCha20 keyed from the OS's CSPRNG (256-bit key)."""
    return np.random.Generator(randomgen.ChaCha(key=secrets.randbits(256), rounds=20))


def skellam(shape: tuple[int, ...], variance: float, generator: np.random.Generator) -> np.ndarray:
    """Integer noise with mean 0 and the given variance: Poisson(v/2) - Poisson(v/2)."""
    if variance < 0:
        raise ValueError(f"variance must be non-negative, got {variance}")
    half = variance / 2
    return generator.poisson(half, size=shape).astype(np.int64) - generator.poisson(half, size=shape).astype(np.int64)


def share_variance(sigma: float, *, parties: int, colluders: int, scale: int) -> float:
    """Each party's share variance, in ring units, for a total honest noise of std ``sigma``.

    Args:
        sigma: target standard deviation in real units.
        parties: n, the number of parties adding shares.
        colluders: t, how many parties may pool their knowledge (receivers included).
        scale: the fixed-point scale (2^precision_bits).
    """
    if not 0 <= colluders < parties:
        raise ValueError(f"collusion threshold must be in 0..{parties - 1}, got {colluders}")
    return (sigma * scale) ** 2 / (parties - colluders)


def add_noise_share(value: object, noise: np.ndarray) -> None:
    """Adds this party's integer noise share to its arithmetic share of ``value``, in place."""
    share = value.share
    value.share = share + torch.from_numpy(noise).to(share.device).reshape(share.shape)
