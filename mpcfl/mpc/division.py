"""Division by a secret-shared count under MPC, kept within fixed point's range.

``1/N`` is too coarse to encode for large N (N = 10^4 is 6.5 units of 2^-16), so the divisor is
``y = s/N`` with a public ``s = ceil(sqrt(B))``, ``B >= N`` a public bound, from Newton's iteration for
``1/x``, ``x = N/s``: ``y <- y (2 - x y)`` from ``y = 1/s`` (``x y = N/B <= 1``), which climbs to s/N
from below and never overshoots, so every factor stays below ``2s``. A mean is then
``(sum / s) * y``, a product of the mean's magnitude (see :mod:`mpcfl.tasks.federated.aggregate`
for the precision this gives). N must be at least 1: Newton's iteration from 0 diverges.
"""

from __future__ import annotations

import math
from typing import Any


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
