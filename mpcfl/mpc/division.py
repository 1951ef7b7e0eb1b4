"""Division by secret-shared values under MPC, kept within fixed point's range.

**A count** (:func:`scaled_reciprocal`). ``1/N`` is too coarse to encode for large N (N = 10^4 is 6.5 units of 2^-16), so the divisor is
``y = s/N`` with a public ``s = ceil(sqrt(B))``, ``B >= N`` a public bound, from Newton's iteration for
``1/x``, ``x = N/s``: ``y <- y (2 - x y)`` from ``y = 1/s`` (``x y = N/B <= 1``), which climbs to s/N
from below and never overshoots, so every factor stays below ``2s``. A mean is then
``(sum / s) * y``, a product of the mean's magnitude (see :mod:`mpcfl.tasks.federated.aggregate`
for the precision this gives). N must be at least 1: Newton's iteration from 0 diverges.

**A positive value over a wide range** (:func:`inverse_power`: ``t / v`` and ``t / sqrt(v)``, for
softmax's denominator and LayerNorm's variance). CrypTen's ``reciprocal`` and ``inv_sqrt`` start
Newton's iteration from an exp-based guess (8 squarings) that holds over a fixed range, then run
10 and 3 steps: 28 and 17 rounds. Here one batched comparison of v with ``2 * 4^k`` for the
range's k finds the power ``4^j`` that brings ``v_s = v / 4^j`` into (1/2, 2]; a quadratic fitted
to the function there (relative error 2.4e-2 for 1/sqrt, 7.4e-2 for 1/x) and two Newton steps
(1.1e-6 and 3.0e-5, below fixed point's 2^-16) follow: 8 + 7 rounds whatever the range. ``4^-j``
and ``2^-j`` are built from the comparison bits as integers (scale 1: exact) times ``4^top`` and
``2^top``, then divided, so they never fall below fixed point's resolution; ``t``'s product with
its factor shares the round of ``v``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mpcfl.mpc import lockstep
from mpcfl.mpc.compat import loaded_crypten


def divisor_scale(bound: int) -> int:
    """s = ceil(sqrt(B)): the divisor is y = s/N, and the sum is divided by s before the product."""
    return math.isqrt(bound - 1) + 1


def newton_iterations(bound: int) -> int:
    """Iterations taking y from 1/s to s/N within 2^-20 relative for any N in [1, B].

    The relative error squares at each step: (1 - N/B)^(2^k) <= exp(-2^k / B) <= 2^-20 once 2^k >= 14 B.
    """
    return math.ceil(math.log2(14 * bound))


def scaled_reciprocal(count: Any, bound: int) -> Any:
    """``s / count`` for a secret-shared count in [1, B], s = :func:`divisor_scale` (see the module docstring)."""
    scale = divisor_scale(bound)
    x = count.div(scale)
    y = x.div(scale * scale).neg() + 2.0 / scale  # the first step from y = 1/s
    for _ in range(newton_iterations(bound) - 1):
        y = y * ((x * y).neg() + 2)
    return y


#: Quadratics c0 + c1 v + c2 v^2 fitted to 1/sqrt(v) and 1/v on [1/2, 2] (least maximum relative error).
_FIRST_GUESS = {0.5: (1.888528, -1.161506, 0.289652), 1: (2.991604, -2.629923, 0.701312)}
_NEWTON_STEPS = 2


@dataclass(frozen=True)
class InversePower:
    """``v^-power`` of a secret v > 0 as ``factor / base^top * core``: ``factor`` an integer
    (scale 1) ``base^(top - j)``, ``core`` = ``v_s^-power`` for ``v_s = v / 4^j`` in (1/2, 2]."""

    factor: Any
    base: int
    top: int
    core: Any

    def times(self, t: Any) -> Any:
        """``t * v^-power`` (2 rounds)."""
        return (t * self.factor).div(self.base**self.top) * self.core


def inverse_power(v: Any, power: float, exponents: range, times: Any = None) -> tuple[InversePower, Any]:
    """``v^-power`` (``power`` 1 or 0.5) for v in (2 * 4^(k0 - 1), 2 * 4^(k1 + 1)], the exponents'
    first and last k, and ``times * v^-power`` where ``times`` is given (else None).

    One batched comparison, then 7 rounds (see the module docstring). Outside the range v_s
    leaves (1/2, 2] and the result degrades (Newton from a poorer guess); v = 0 gives finite
    garbage, so a zero numerator still gives 0 (softmax's fully masked rows).
    """
    base = {1: 4, 0.5: 2}[power]
    top = exponents[-1] + 1
    above = loaded_crypten().stack([v - 2.0 * 4.0**k for k in exponents]).gt(0)  # 0/1 at scale 1

    def powers(base: int) -> Any:
        """base^(top - j) as an integer secret: one step down at each threshold passed."""
        value = base ** (top - exponents[0])
        for i, k in enumerate(exponents):
            value = above[i] * (base ** (top - k - 1) - base ** (top - k)) + value
        return value

    scale = powers(4)
    factor = scale if base == 4 else powers(base)
    pairs = [(v, scale)] + ([] if times is None else [(times, factor)])
    scaled, *rest = lockstep.products(pairs)
    y = inverse_power_near_one(scaled.div(4**top), power)
    inverse = InversePower(factor, base, top, y)
    return inverse, (None if times is None else rest[0].div(base**top) * y)


def inverse_power_near_one(v: Any, power: float) -> Any:
    """``v^-power`` (``power`` 1 or 0.5) for v in [1/2, 2]: a fitted quadratic, then two Newton
    steps (relative error 3.0e-5 for 1/v, 1.1e-6 for 1/sqrt(v)); 5 rounds."""
    c0, c1, c2 = _FIRST_GUESS[power]
    y = v.square() * c2 + v * c1 + c0
    for _ in range(_NEWTON_STEPS):
        if power == 1:  # y (2 - v y)
            y = y * ((v * y).neg() + 2)
        else:  # y (3 - v y^2) / 2 as 1.5 y - 0.5 (v y)(y^2): its two first products in one round
            square, vy = lockstep.products([(y, y), (v, y)])
            y = y * 1.5 - vy * square * 0.5
    return y
