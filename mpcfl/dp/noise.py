"""Integer noise for DP in CrypTen's fixed-point encoding, drawn jointly by the parties.

Each party draws a share of the noise from a cryptographically secure generator
(the caller passes one: :func:`mpcfl.mpc.prng.numpy_generator`)
and adds it to its own arithmetic share of the value, in ring units (2^-16),
just before the reveal: no communication, and the revealed value carries the sum
of all parties' shares while each party knows only its own.

Gaussian-like noise is Skellam: the difference of two Poisson draws. Skellam
variables are integers and the sum of Skellams is Skellam. With n parties and a
collusion threshold t (colluders pool their own shares and subtract them; the
receivers count among them), each share has variance sigma^2 / (n - t), so the
n - t honest shares alone reach the target sigma^2.

Laplace noise is discrete Laplace, built the same way from infinitely divisible
parts: a geometric variable is the sum of m negative-binomial(1/m) variables, so
each party adds NB(1/(n-t), p) - NB(1/(n-t), p) and any n - t honest shares sum
to exactly a discrete Laplace of the target scale.
"""

from __future__ import annotations

import numpy as np
import torch


#: numpy's Poisson sampler drifts above a mean of about 2^46 (its variance 3% off at 2^48, 9% at 2^50)
#: and loses its low bits above 2^53 (a noised value's low bits would be exact): no single draw has a
#: mean above this.
MAX_POISSON_MEAN = float(1 << 44)
#: The largest Skellam variance drawn (ring units squared: a standard deviation of 2^28 ring units,
#: 4096 in the value's units), so that at most 2^11 draws make up one Poisson.
MAX_VARIANCE = float(1 << 56)


def skellam(shape: tuple[int, ...], variance: float, generator: np.random.Generator) -> np.ndarray:
    """Integer noise with mean 0 and the given variance: Poisson(v/2) - Poisson(v/2), each Poisson
    drawn as a sum of ``k`` Poissons of mean at most :data:`MAX_POISSON_MEAN` (a sum of Poissons is Poisson)."""
    if not 0 <= variance <= MAX_VARIANCE:
        raise ValueError(f"Skellam variance {variance:.3g} is outside [0, 2^56] ring units squared (a standard "
                         "deviation above 4096): lower the noise (a larger epsilon, fewer steps)")
    half = variance / 2
    parts = max(1, int(np.ceil(half / MAX_POISSON_MEAN)))

    def poisson() -> np.ndarray:
        return generator.poisson(half / parts, size=(parts, *shape)).astype(np.int64).sum(axis=0)

    return poisson() - poisson()


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


def discrete_laplace_parts(shape: tuple[int, ...], scale: float, parts: int, generator: np.random.Generator) -> np.ndarray:
    """One of ``parts`` shares whose sum is discrete Laplace: P(k) proportional to exp(-|k| / scale)."""
    if scale <= 0 or parts < 1:
        raise ValueError(f"need a positive scale and parts, got {scale}, {parts}")
    p = -np.expm1(-1.0 / scale)  # success probability of the geometric: 1 - exp(-1/scale)
    draw = lambda: generator.negative_binomial(1.0 / parts, p, size=shape).astype(np.int64)  # noqa: E731
    return draw() - draw()


def noise_share(
    mechanism: str, shape: tuple[int, ...], scale: float, *, parties: int, colluders: int, fixed_point: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """This party's integer share, in ring units, of noise whose honest part has the target ``scale``.

    Args:
        mechanism: ``gaussian`` (``scale`` = standard deviation) or ``laplace`` (``scale`` = b).
        shape: the value's shape.
        scale: in the value's real units.
        parties: n; colluders: t; fixed_point: the encoder's scale (2^16).
    """
    if not 0 <= colluders < parties:
        raise ValueError(f"collusion threshold must be in 0..{parties - 1}, got {colluders}")
    if mechanism == "gaussian":
        return skellam(shape, share_variance(scale, parties=parties, colluders=colluders, scale=fixed_point), generator)
    if mechanism == "laplace":
        return discrete_laplace_parts(shape, scale * fixed_point, parties - colluders, generator)
    raise ValueError(f"unknown mechanism {mechanism!r}")


def add_noise_share(value: object, noise: np.ndarray) -> None:
    """Adds this party's integer noise share to its arithmetic share of ``value``, in place."""
    share = value.share
    value.share = share + torch.from_numpy(noise).to(share.device).reshape(share.shape)
