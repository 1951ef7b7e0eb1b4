"""The binary head's sigmoid under MPC: CrypTen's, or a cheaper approximation on clamped logits.

CrypTen's sigmoid (exp by 8 squarings, then a Newton reciprocal) is accurate to ~1e-3 but
costs about 30 sequential multiplications. The cheap ones clamp the logit to ``[-a, a]``
(one comparison: both sides' excess in one ``relu``) and then evaluate an odd polynomial
in ``t = z / a``: ``p = 1/2 + sum_k c_k t^k``.

- ``piecewise``: the hard sigmoid ``clamp(z / 4 + 1/2, 0, 1)`` (degree 1, ``a = 2``, as
  in SecureML): no multiplication after the clamp; max error 0.12, output in [0, 1].
- ``poly``: the degree-9 least-squares fit on [-8, 8]: four more rounds (t^2; t^4; t^6 and
  t^8 in one batched product; t times the even part); max error 0.016.

Clamping is not optional. Unclamped, an odd polynomial leaves [0, 1] fast beyond its
interval (degree 9 fitted on [-8, 8] gives ~1e3 at 16), and logits do go there: the
breast-cancer demo reaches |z| ~ 58 with the exact sigmoid, and with an unclamped
polynomial its plaintext simulation diverges (test accuracy 63%). Clamped, the output
lies within :attr:`Sigmoid.range` for every input, which is what DP-SGD's sensitivity
and the fixed-point bounds rely on.

The approximation only feeds training's gradient (the head's ``output_error``); the
secure loss and accuracy keep their own exact formulas, and ``mpcfl baseline`` trains
with the exact sigmoid, so the comparison measures the approximation's cost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mpcfl.mpc.engine import import_crypten

if TYPE_CHECKING:  # torch is imported where a sigmoid runs: the job schema reads NAMES without it
    import torch

NAMES = ("crypten", "piecewise", "poly")
DEFAULT = "crypten"


def clamp_symmetric(z: Any, limit: float) -> Any:
    """``clamp(z, -limit, limit)`` under MPC in one comparison's rounds (both excesses in one relu)."""
    excess = import_crypten().stack([z - limit, z.neg() - limit]).relu()
    return z - excess[0] + excess[1]


@functools.lru_cache(maxsize=None)
def fit_odd(degree: int, limit: float) -> tuple[float, ...]:
    """Least-squares coefficients c_1, c_3, ... of ``sigmoid(z) - 1/2 ~ sum c_k (z / limit)^k`` on [-limit, limit].

    A dense uniform grid: every part of the interval counts the same (a Gaussian weight on
    the centre raised the maximum error, e.g. degree 7 on [-16, 16]: 0.19 against 0.11).
    """
    z = np.linspace(-limit, limit, 4001)
    t = z / limit
    powers = np.stack([t**k for k in range(1, degree + 1, 2)], axis=1)
    coefficients, *_ = np.linalg.lstsq(powers, 1.0 / (1.0 + np.exp(-z)) - 0.5, rcond=None)
    return tuple(float(c) for c in coefficients)


@dataclass(frozen=True)
class Sigmoid:
    """One way to compute the sigmoid under MPC, and what it guarantees.

    ``limit`` None is CrypTen's own sigmoid: accurate, in [0, 1] for logits within about
    +-500 (beyond, garbage: callers that rely on the range clamp first).
    """

    name: str
    limit: float | None = None  # logits are clamped to +-limit first
    coefficients: tuple[float, ...] = ()  # c_1, c_3, ... of the odd polynomial in z / limit

    def __post_init__(self) -> None:
        if len(self.coefficients) > 5:
            raise ValueError("secure() evaluates odd polynomials up to degree 9")

    @property
    def clamps(self) -> bool:
        """Whether the output lies within :attr:`range` for every logit (no clamp needed before it)."""
        return self.limit is not None

    def plain(self, z: torch.Tensor) -> torch.Tensor:
        """The same approximation on plain tensors (float64 for the reference figures)."""
        import torch

        if self.limit is None:
            return torch.sigmoid(z)
        t = z.clamp(-self.limit, self.limit) / self.limit
        return 0.5 + sum(c * t ** (2 * i + 1) for i, c in enumerate(self.coefficients))

    def secure(self, z: Any) -> Any:
        """The approximation on a CrypTensor, with as few sequential products as its degree allows."""
        if self.limit is None:
            return z.sigmoid()
        clamped, c = clamp_symmetric(z, self.limit), self.coefficients
        if len(c) == 1:  # piecewise: linear between the clamps, one public scaling
            return clamped.mul(c[0] / self.limit) + 0.5
        t = clamped.mul(1.0 / self.limit)
        # Paterson-Stockmeyer style: t^2 and t^4 by squaring (cheaper than products under a
        # dealer), t^6 and t^8 in one batched product, then one product by t: 4 rounds for degree 9.
        even = [t.square()]
        if len(c) > 2:
            even.append(even[0].square())
        if len(c) > 3:
            stack = import_crypten().stack
            highs = stack([even[0], even[1]][: len(c) - 3]).mul(stack([even[1], even[1]][: len(c) - 3]))
            even += [highs[i] for i in range(highs.size(0))]
        inner = even[0].mul(c[1]) + c[0]  # c_1 + c_3 t^2 + c_5 t^4 + ...: local
        for power, ck in zip(even[1:], c[2:]):
            inner = inner + power.mul(ck)
        return t.mul(inner) + 0.5

    @functools.cached_property
    def range(self) -> tuple[float, float]:
        """(low, high): the output's range over every logit."""
        import torch

        if self.limit is None:
            return 0.0, 1.0
        grid = torch.linspace(-self.limit, self.limit, 200_001, dtype=torch.float64)
        values = self.plain(grid)
        return float(values.min()), float(values.max())

    @property
    def error_bound(self) -> float:
        """A bound on ``|p - y|`` for a 0/1 label y, whatever the logit (CrypTen's: within +-500)."""
        low, high = self.range
        return max(high, 1.0 - low)


SIGMOIDS = {
    "crypten": Sigmoid("crypten"),
    "piecewise": Sigmoid("piecewise", limit=2.0, coefficients=(0.5,)),
    "poly": Sigmoid("poly", limit=8.0, coefficients=fit_odd(9, 8.0)),
}
