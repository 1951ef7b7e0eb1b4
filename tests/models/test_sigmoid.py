"""training.sigmoid: the cheap sigmoids' error and range, in plain torch and under MPC, and what DP makes of them."""

from __future__ import annotations

import math

import pytest
import torch

from mpcfl.models.heads import BinaryHead, head_of
from mpcfl.models.sigmoid import NAMES, SIGMOIDS, fit_odd
from mpcfl.models.spec import ModelSpec
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal

# name: (largest error inside the clamp, largest anywhere, output range)
EXPECTED = {"piecewise": (0.1192, 0.1193, (0.0, 1.0)), "poly": (0.0164, 0.0164, (-0.016, 1.016))}
LOGITS = torch.cat([torch.linspace(-40, 40, 8001), torch.tensor([-1e4, -500.0, 500.0, 1e4])]).double()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_error_and_range_inside_and_outside_the_clamp(name: str) -> None:
    sigmoid = SIGMOIDS[name]
    inside_bound, anywhere_bound, (low, high) = EXPECTED[name]
    p, exact = sigmoid.plain(LOGITS), torch.sigmoid(LOGITS)
    inside = LOGITS.abs() <= sigmoid.limit
    assert (p - exact)[inside].abs().max() <= inside_bound
    assert (p - exact).abs().max() <= anywhere_bound
    # The output never leaves its range, however large the logit: the clamp makes it a bound.
    assert low - 1e-3 <= sigmoid.range[0] <= p.min() and p.max() <= sigmoid.range[1] <= high + 1e-3
    assert sigmoid.error_bound == pytest.approx(max(high, 1 - low), abs=1e-3)
    # Odd about 1/2, monotone to the clamp's edge within the fit's wiggle.
    assert torch.allclose(p + sigmoid.plain(-LOGITS), torch.ones_like(p))


def test_poly_is_the_least_squares_fit() -> None:
    """Its coefficients are the fit's: moving any of them raises the squared error on the interval."""
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    coefficients = fit_odd(9, 8.0)
    assert coefficients == SIGMOIDS["poly"].coefficients

    def residual(c: tuple[float, ...]) -> float:
        t = z / 8
        return float(((0.5 + sum(ck * t ** (2 * i + 1) for i, ck in enumerate(c))) - torch.sigmoid(z)).square().sum())

    best = residual(coefficients)
    for i in range(len(coefficients)):
        for step in (-1e-3, 1e-3):
            moved = tuple(c + step * (j == i) for j, c in enumerate(coefficients))
            assert residual(moved) > best


def test_secure_sigmoids_match_their_plain_twins(crypten_single: None) -> None:
    crypten = import_crypten()
    z = torch.cat([torch.linspace(-30, 30, 241), torch.tensor([-3000.0, 3000.0])]).reshape(-1, 1)
    for name in NAMES:
        sigmoid = SIGMOIDS[name]
        got = reveal(sigmoid.secure(crypten.cryptensor(z)), to=[0], what=f"test {name}").double()
        expected = sigmoid.plain(z.double())
        if sigmoid.clamps:  # fixed point (16 fractional bits) is all that differs, for any logit
            assert (got - expected).abs().max() < 1e-3, name
            assert sigmoid.range[0] - 1e-3 <= got.min() and got.max() <= sigmoid.range[1] + 1e-3, name
        else:  # CrypTen's own approximation; garbage beyond |z| ~ 500, which is why DP clamps before it
            assert (got - expected)[z.abs() <= 30].abs().max() < 5e-3, name


def test_binary_head_uses_the_named_sigmoid_and_its_bound() -> None:
    spec = ModelSpec(type="logistic_regression")
    crypten_head, poly_head = head_of(spec), head_of(spec, "poly")
    assert isinstance(poly_head, BinaryHead) and poly_head.sigmoid is SIGMOIDS["poly"]
    assert crypten_head.gradient_bound == 1.0 and not crypten_head.bounded_error
    assert poly_head.gradient_bound == pytest.approx(1.016, abs=1e-3) and poly_head.bounded_error
    assert head_of(spec, "piecewise").gradient_bound == 1.0
    assert not head_of(ModelSpec(type="mlp", hidden=[4], num_classes=3), "crypten").bounded_error
    assert math.isclose(SIGMOIDS["piecewise"].range[1], 1.0)
