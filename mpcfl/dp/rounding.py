"""Fixed-point rounding in the sensitivity of the integer (Skellam) mechanism.

The noise lands on a value in ring units (2^-16, :data:`FIXED_POINT_SCALE`) that MPC computed with
rounding: each party's input is encoded by truncation, and every division by a public integer (a
product's rescaling by 2^16, a mean's division by a count) truncates again. Clipping bounds the
*real* value's change between neighbouring datasets (``l2``, real units); the ring value can move
further, by the rounding. So the sensitivity the Skellam noise must cover, in ring units, is

    Delta_2 = l2 * scale + |r|_2,    Delta_1 = l2 * scale * sqrt(d) + |r|_1,

with r the largest per-coordinate difference the rounding can make between the two neighbours
(:class:`Rounding`; d coordinates). Each code path that adds noise states its r next to the code
(:func:`encoded_sum` for federated averaging, :func:`mpcfl.tasks.train.dp_sgd.gradient_rounding` for DP-SGD),
from two facts about CrypTen 0.4.1 (``encoder.py``, ``mpc/primitives/arithmetic.py``, ``beaver.py``):

- encoding: ``(scale * x).long()`` truncates toward zero, off by less than :data:`ENCODING` = 1 unit;
- division by a public integer q (:func:`truncation_error`): every party truncates its own share,
  so the result is off by less than one unit per party; with more than two parties a correction
  for the shares' wraps around the ring is subtracted, as ``4 * (2^62 // q)`` per wrap where the
  exact amount is 2^64 / q, off by ``4 (2^62 mod q) / q`` more per wrap (at most n - 1 wraps).
  Both exclude the event CrypTen itself neglects: shares whose sum wraps the ring, which happens
  with probability about ``|v| 2^-47`` (two parties) or ``|v| / 2^32`` (more) per entry for a value
  v, and breaks that entry entirely (:mod:`mpcfl.dp.clipping`, "Scope"); no bound here covers it.

Replace-one neighbours: the rounding of the record that changes differs between the two datasets
(a truncation in one, its opposite in the other), and CrypTen's truncation depends on the random
shares, so r counts both sides: twice each error. The other records' terms are the same in both
(for the same shares), so their rounding cancels. The mechanism is a mixture over the shares of
mechanisms each with this sensitivity, and joint convexity carries their bound to the mixture.

Accounting. Agarwal, Kairouz and Liu (The Skellam Mechanism for Differentially Private Federated
Learning, NeurIPS 2021; Theorem 3.5, with mu the noise's variance in ring units) bound the RDP
of Skellam noise with integer sensitivities Delta_1, Delta_2 by

    eps(alpha) <= alpha Delta_2^2 / (2 mu) + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu)).

For alpha >= 1 the second term is at most alpha (Delta_2^2 + 3 Delta_1) / (2 mu^2), so the whole is at
most that of a Gaussian of the same variance with the *effective* sensitivity
``sqrt(Delta_2^2 + (Delta_2^2 + 3 Delta_1) / mu)`` (:func:`effective_sensitivity`). Noise of standard
deviation z times it is therefore dominated, order by order, by the Gaussian mechanism of
multiplier z that the accountant charges: the ledger's charges stay Gaussian (and PLD keeps
working), and the calibration's noise carries the rounding and the integer mechanism's excess.

:func:`check_rounding` refuses a job where that matters by more than :data:`TOLERANCE` of epsilon
(the noise calibrated to the clip alone would spend more than 1.01 epsilon): with d parameters the
rounding grows as sqrt(d) ring units in Delta_2 and d in Delta_1, against ``l2 * 2^16`` from the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpcfl.dp.accountant import Charge, create_accountant

FIXED_POINT_SCALE = 2**16  # CrypTen's encoder: cfg.encoder.precision_bits = 16, which mpcfl never changes
ENCODING = 1.0  # |trunc(x * scale) - x * scale| < 1 ring unit
TOLERANCE = 0.01  # the share of epsilon rounding may move before a job is refused


def truncation_error(parties: int, divisor: int) -> float:
    """A bound, in ring units, on how far CrypTen's division of a shared value by the public
    integer ``divisor`` is from the exact quotient, with ``parties`` parties (module docstring)."""
    wraps = 4 * (2**62 % divisor) / divisor * (parties - 1) if parties > 2 else 0.0
    return parties + wraps


@dataclass(frozen=True)
class Rounding:
    """How far rounding can move the value the noise lands on between two neighbouring datasets,
    in ring units: the L2 and L1 norms of the per-coordinate bound (both sides counted)."""

    l2: float = 0.0
    l1: float = 0.0

    @classmethod
    def per_coordinate(cls, coordinates: int, units: float) -> Rounding:
        """``units`` in each of ``coordinates`` coordinates."""
        return cls(math.sqrt(coordinates) * units, coordinates * units)

    def __add__(self, other: Rounding) -> Rounding:
        """Two rounding terms on the same coordinates or on others: the norms add (triangle inequality)."""
        return Rounding(self.l2 + other.l2, self.l1 + other.l1)


def ring_sensitivity(l2: float, rounding: Rounding, *, dimension: int, scale: int = FIXED_POINT_SCALE) -> tuple[float, float]:
    """(Delta_1, Delta_2) in ring units: the clip's real L2 sensitivity ``l2`` at the encoder's
    scale (its L1 at most sqrt(dimension) times it), plus the rounding."""
    return l2 * scale * math.sqrt(dimension) + rounding.l1, l2 * scale + rounding.l2


def skellam_rdp(order: float, *, l1: float, l2: float, variance: float) -> float:
    """Agarwal, Kairouz and Liu's RDP bound at ``order`` for Skellam noise of ``variance`` on a
    value of integer sensitivities ``l1``, ``l2`` (all in ring units)."""
    second = min(((2 * order - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return order * l2**2 / (2 * variance) + second


def effective_sensitivity(
    l2: float, rounding: Rounding, *, dimension: int, noise_multiplier: float, scale: int = FIXED_POINT_SCALE
) -> float:
    """The sensitivity, in real units, to calibrate Skellam noise to: noise of standard deviation
    ``noise_multiplier`` times it is dominated by the Gaussian of that multiplier (module docstring).

    The variance in the bound's excess term is taken at its smallest, ``(z Delta_2)^2``; the noise's
    is larger, which only shrinks that term."""
    l1_ring, l2_ring = ring_sensitivity(l2, rounding, dimension=dimension, scale=scale)
    least_variance = (noise_multiplier * l2_ring) ** 2
    return math.sqrt(l2_ring**2 + (l2_ring**2 + 3 * l1_ring) / least_variance) / scale


def check_rounding(
    *, epsilon: float, delta: float, accountant: str, noise_multiplier: float, count: int, l2: float,
    rounding: Rounding, dimension: int, extra: list[Charge] | None = None, scale: int = FIXED_POINT_SCALE,
    sampling_probability: float = 1.0,
) -> float:
    """Refuses a mechanism whose rounding moves epsilon by more than :data:`TOLERANCE`.

    Args:
        noise_multiplier: z, calibrated for ``count`` Gaussians (with ``extra`` charges) within (epsilon, delta),
            each on a Poisson sample of rate ``sampling_probability`` when it is below 1.
        l2: the clip's real L2 sensitivity of the value the noise lands on.
        rounding: that value's rounding (:class:`Rounding`); dimension: its coordinates.

    Returns:
        The sensitivity to calibrate the noise to (:func:`effective_sensitivity`).

    Raises:
        ValueError: noise calibrated to ``l2`` alone would spend more than (1 + TOLERANCE) times what
            the Gaussian charges of multiplier z do; the message says how much and what to change.
    """
    effective = effective_sensitivity(l2, rounding, dimension=dimension, noise_multiplier=noise_multiplier, scale=scale)
    others = list(extra or [])
    reference = create_accountant(accountant, epsilon=epsilon)
    q = sampling_probability
    stated = reference.epsilon(delta, extra=[Charge("gaussian", noise_multiplier, count, q), *others])
    # Noise z * l2 on a value of sensitivity `effective` is a Gaussian of multiplier z * l2 / effective.
    spent = reference.epsilon(delta, extra=[Charge("gaussian", noise_multiplier * l2 / effective, count, q), *others])
    if spent > stated * (1 + TOLERANCE):
        per_coordinate = rounding.l1 / dimension
        raise ValueError(
            f"fixed-point rounding (up to {per_coordinate:.3g} units of 2^-16 in each of {dimension} parameters) "
            f"against a clip of L2 sensitivity {l2:.4g} would make epsilon {spent:.4g}, not {stated:.4g}; "
            "raise the clip or use fewer parameters"
        )
    return effective


def encoded_sum(dimension: int) -> Rounding:
    """The rounding of a secret-shared sum of encoded inputs when the neighbour replaces one input:
    that input's encoding truncates each coordinate by less than :data:`ENCODING` on either side;
    the other inputs encode identically in both, and shares add integers exactly."""
    return Rounding.per_coordinate(dimension, 2 * ENCODING)
