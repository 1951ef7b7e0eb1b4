"""Clipping: feature rows in plaintext, and per-example gradients under MPC for MLPs
(Sequential Linear / ReLU / Sigmoid).

No per-example gradient is ever materialised. For a linear layer, example i's
weight gradient is the outer product of its backpropagated error d_i and its
input a_i, so its squared norm is |d_i|^2 |a_i|^2, plus |d_i|^2 for the bias
(Goodfellow, 2015). One backward pass over the batch gives every example's
total gradient norm; the clipped sum is then one matmul per layer,
``(c * d)^T a``, with c_i the example's clipping factor.

The clip is a guarantee, for any input and any weights the run can reach
---------------------------------------------------------------------------
Fixed point (16 fractional bits, signed 64-bit ring) wraps a product silently
once it passes 2^31, and CrypTen's sigmoid leaves [0, 1] for inputs beyond about
500. Nothing a run computes may depend on either not happening, so every value
the clipped gradient depends on is bounded by public numbers, not by data:

- each feature lies in ``[-X, X]`` (``data.max_abs``: each party clamps its own
  values before sharing, part of the mechanism);
- every parameter lies in ``[-W, W]`` (``dp.weight_bound``): projected after each
  step, under MPC (:func:`project`);
- the logits, and a hidden sigmoid's input, are clamped to +-:data:`LOGIT_CLAMP`
  before the sigmoid or softmax, so each output error is at most the head's bound
  (a clamp's derivative is not used: the error at the clamped point is pushed back).

From these, :func:`layer_bounds` propagates per-entry bounds through the layers
(inputs forward, errors backward) and :func:`check_bounds` refuses, naming the
layer, an architecture whose products could reach 2^31: a refused model gets no
DP, never a weaker one. With every product in range, the squared norm is exact up
to rounding, and the factor min(1, C/|g|) (1/sqrt is an approximation) is forced
into [0, 1] by comparisons, which are exact for any ring element. A last check of
the clipped squared norm, computed from the clipped errors c_i d_i as they are
(truncation included), against C^2 (1 + margin) drops (factor 0) any example the
approximation got wrong, so every example's contribution is at most C sqrt(1 + margin)
whatever 1/sqrt returns: that bound, plus the final matmul's truncation
(:func:`mpcfl.tasks.train.dp_sgd.gradient_rounding`), is the sensitivity the noise is calibrated to.

Scope: CrypTen truncates a product of two parties' shares locally (off by one unit
at most, except with probability about |v| 2^-47); with three or more parties its
truncation protocol errs with probability about |v| / 2^32 per product, and an
error there can void one example's bound in one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from mpcfl.errors import MpcflError

MARGIN = 0.01
LOGIT_CLAMP = 32.0  # e^-32 is below fixed point's 2^-16: no representable sigmoid output changes
PRODUCT_LIMIT = 2.0**31  # |a * b| (or a sum of such products) at which an encoded product wraps
SUM_LIMIT = 2.0**46  # a value that is only added wraps at 2^47; keep a factor two
_SIGMOID_SLOPE = 0.25 * 1.01  # s (1 - s) for s in [0, 1], and CrypTen's sigmoid's error on clamped inputs

Clamp = Callable[[Any, float], Any]  # (x, limit) -> clamp(x, -limit, limit), under MPC


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Scales each row down to L2 norm ``bound`` if it is longer; shorter rows are untouched."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def sensitivity(clip: float) -> float:
    """The L2 bound on one example's clipped gradient."""
    return clip * (1 + MARGIN) ** 0.5


@dataclass(frozen=True)
class LayerBound:
    """Public per-entry bounds at one Linear layer, for every input and weight the run can reach."""

    name: str  # e.g. "layer 1 (Linear 30 -> 16)"
    inputs: int
    outputs: int
    input_bound: float  # |a| per entry of the layer's input
    error_bound: float  # |d| per entry of the error at the layer's output

    @property
    def squared_norm(self) -> float:
        """The largest |d|^2 (|a|^2 + 1): this layer's part of an example's squared gradient norm."""
        return self.outputs * self.error_bound**2 * (self.inputs * self.input_bound**2 + 1)

    def products(self, weight: float, batch: int) -> dict[str, float]:
        """The largest magnitude each computation on this layer reaches, by what it is."""
        a, d = self.input_bound, self.error_bound
        return {
            "pre-activations": self.inputs * weight * a + weight,
            "backpropagated errors": self.outputs * weight * d,
            "per-example squared norms": self.squared_norm,
            "summed gradients": batch * d * a,
        }


def layer_bounds(
    torch_model: nn.Sequential, *, input_bound: float, weight_bound: float, error_bound: float
) -> list[LayerBound]:
    """Per-entry bounds of each Linear layer's input and output error (see the module docstring).

    Args:
        torch_model: the MLP (Linear, ReLU, Sigmoid children).
        input_bound: X, every feature's magnitude.
        weight_bound: W, every parameter's magnitude.
        error_bound: every entry of d(loss)/d(logits) at clamped logits (the head's bound).

    Raises:
        MpcflError: a layer the clip does not cover.
    """
    layers: list[list[Any]] = []  # [Linear, activation after it or None]
    for name, layer in torch_model.named_children():
        if isinstance(layer, nn.Linear):
            layers.append([layer, None])
        elif isinstance(layer, (nn.ReLU, nn.Sigmoid)) and layers:
            layers[-1][1] = layer
        else:
            raise MpcflError(
                f"layer {name} ({type(layer).__name__}): per-example clipping covers Linear layers, each "
                "followed by ReLU or Sigmoid; DP cannot bound this model"
            )
    inputs = [input_bound]
    for layer, activation in layers[:-1]:
        pre = layer.in_features * weight_bound * inputs[-1] + weight_bound
        inputs.append(1.0 if isinstance(activation, nn.Sigmoid) else pre)
    errors = [error_bound]
    for (layer, _), (_, activation) in zip(reversed(layers[1:]), reversed(layers[:-1])):
        slope = _SIGMOID_SLOPE if isinstance(activation, nn.Sigmoid) else 1.0
        errors.insert(0, layer.out_features * weight_bound * errors[0] * slope)
    return [
        LayerBound(f"layer {i + 1} (Linear {layer.in_features} -> {layer.out_features})",
                   layer.in_features, layer.out_features, a, d)
        for i, ((layer, _), a, d) in enumerate(zip(layers, inputs, errors))
    ]


def check_bounds(bounds: list[LayerBound], *, weight_bound: float, batch: int) -> float:
    """Refuses a model whose clipped-gradient computation could wrap fixed point.

    Every product must stay below :data:`PRODUCT_LIMIT`, and the per-example squared
    norms summed over the layers below half of it (the clipped norm multiplies that
    sum by a factor in [0, 1]).

    Returns:
        The headroom: how many times the largest product could grow before wrapping.

    Raises:
        MpcflError: names the layer and the computation that could wrap.
    """
    worst, total = 0.0, 0.0
    for layer in bounds:
        products = layer.products(weight_bound, batch)
        total += products["per-example squared norms"]
        for what, value in products.items():
            limit = PRODUCT_LIMIT / 2 if what == "per-example squared norms" else PRODUCT_LIMIT
            if value >= limit:
                raise MpcflError(
                    f"{layer.name}: its {what} can reach {value:.3g} for inputs within data.max_abs and weights "
                    f"within dp.weight_bound={weight_bound:g}, beyond fixed point's {limit:.3g}: the clip would "
                    "not hold; lower data.max_abs or dp.weight_bound, or use fewer or narrower layers"
                )
            worst = max(worst, value / limit)
    if total >= PRODUCT_LIMIT / 2:
        raise MpcflError(
            f"the per-example squared gradient norm can reach {total:.3g} for inputs within data.max_abs and "
            f"weights within dp.weight_bound={weight_bound:g}, beyond fixed point's {PRODUCT_LIMIT / 2:.3g}: the "
            "clip would not hold; lower data.max_abs or dp.weight_bound, or use fewer or narrower layers"
        )
    return 1.0 / max(worst, total / (PRODUCT_LIMIT / 2))


def largest_squared_norm(bounds: list[LayerBound]) -> float:
    """A public bound on any example's squared gradient norm (:func:`check_bounds` keeps it below 2^30)."""
    return sum(layer.squared_norm for layer in bounds)


# CrypTen's 1/sqrt (an exp-based first guess, three Newton steps) is accurate only for inputs in
# about [0.1, 200]: past that it returns garbage, and every clipped example would be dropped. So
# u = |g|^2 / C^2 is taken at scales 100^k, each in range for u in [100^k, 100^(k+1)), and the
# right one is picked by comparisons of u with the scales: K + 1 inverse roots in one batched
# call, K comparisons in one, for any |g| up to the public bound.
_SCALE_STEP = 100.0
_SHRINK, _ULPS = 0.995, 4 * 2.0**-16


def _inverse_norm(u: Any, *, largest: float, stack: Callable[[list[Any]], Any]) -> Any:
    """About 1/sqrt(u) for u >= 1 up to ``largest`` (anything for u < 1: the caller caps it at 1)."""
    levels = max(0, math.ceil(math.log(max(largest, 1.0), _SCALE_STEP)))
    if levels == 0:
        return u.inv_sqrt()
    scales = [_SCALE_STEP**k for k in range(levels + 1)]
    roots = stack([u.div(scale) for scale in scales]).inv_sqrt()
    above = stack([u - scale for scale in scales[1:]]).ge(0.0)  # u >= 100^j, j = 1..K
    # y_0 + sum_j [u >= 100^j] (y_j - y_(j-1)), with y_k = inv_sqrt(u / 100^k) / 10^k
    steps = stack([roots[k].div(math.sqrt(scales[k])) - roots[k - 1].div(math.sqrt(scales[k - 1])) for k in range(1, levels + 1)])
    return roots[0] + (above * steps).sum(dim=0)


# The check measures |c d|^2 (|a|^2 + 1) per layer, where c d is a few units of 2^-16 for a large
# gradient and |a|^2 + 1 up to 10^6 (a hidden layer's bound): a truncated square of c d may lose a
# unit, which times |a|^2 would let an example past the check unclipped. So c d is also taken
# 2^_PRECISION times larger (the shares multiplied by an integer: exact), squared, and the product
# divided back, which loses units only after |a|^2 multiplied them. That product is 2^(2 _PRECISION)
# times the squared norm and wraps once it passes 2^31, so a first, coarse measure at the plain scale
# (which cannot wrap) must be below _COARSE = 2^13 < 2^(31 - 2 _PRECISION) for the fine one to count.
_PRECISION = 8
_COARSE = 2.0**13


def _fits(
    scaled: list[Any], input_norms: list[Any], widths: list[int], *, clip: float, truncation: float,
    stack: Callable[[list[Any]], Any],
) -> Any:
    """1 for each example whose clipped gradient provably has norm at most C sqrt(1 + MARGIN), else 0:
    upper bounds on its squared norm, each truncation counted at its worst, against the bound."""
    coarse, fine = None, None
    for layer_scaled, norm, width in zip(scaled, input_norms, widths):
        outputs = layer_scaled.size(1)
        loose = norm + width * truncation  # |a|^2 + 1, each of its `width` squares up to a truncation low
        high = layer_scaled.clone()
        high.share = high.share * 2**_PRECISION
        coarse_term = (layer_scaled.square().sum(dim=1) + outputs * truncation) * loose + truncation
        fine_term = ((high.square().sum(dim=1) + outputs * truncation) * loose).div(4**_PRECISION) + 2 * truncation
        coarse = coarse_term if coarse is None else coarse + coarse_term
        fine = fine_term if fine is None else fine + fine_term
    checks = stack([coarse - _COARSE, fine - clip**2 * (1 + MARGIN)]).le(0.0)
    return checks[0] * checks[1]  # 0/1 of scale 1: the products with it below are exact


def clipped_gradient_sum(
    model: Any,
    torch_model: nn.Sequential,
    x: Any,
    y: Any,
    *,
    clip: float,
    output_error: Callable[[Any, Any], Any],
    clamp: Clamp,
    stack: Callable[[list[Any]], Any],
    largest: float = 2.0**30,
    truncation: float = 2.0**-16,
    weights: Any | None = None,
) -> dict[str, Any]:
    """The sum over the batch of each example's gradient clipped to norm ``clip``.

    The bound holds for features within ``data.max_abs`` and parameters within
    ``dp.weight_bound`` (:func:`check_bounds` refused the model otherwise).

    Args:
        model: the encrypted crypten model (parameters named like ``torch_model``'s).
        torch_model: the plain architecture, for the layer types.
        x: the batch's features, a CrypTensor (B x d).
        y: the batch's targets, encoded as ``output_error`` wants them.
        clip: the norm bound C.
        output_error: (logits, y) -> each example's d(loss)/d(logits), the head's
            (:meth:`mpcfl.models.heads.Head.output_error`).
        clamp: clamps a CrypTensor to +-limit (:func:`mpcfl.models.sigmoid.clamp_symmetric`).
        stack: ``crypten.stack``.
        largest: a public bound on any example's squared gradient norm (:func:`largest_squared_norm`).
        truncation: how far below the product one truncation may land: a unit of 2^-16 per party
            (:mod:`mpcfl.dp.rounding`).
        weights: each example's secret 0/1 inclusion bit (B x 1, scale 1), multiplied into its
            clipping factor: the sum over a secret sample; None: every example.

    Returns:
        Encrypted gradient sums by parameter name.
    """
    params = dict(model.named_parameters())
    inputs: list[tuple[str, Any]] = []  # (layer name, its input) for each Linear
    derivatives: list[Any] = []  # per activation, its derivative at the forward point
    activation = x
    for name, layer in torch_model.named_children():
        if isinstance(layer, nn.Linear):
            inputs.append((name, activation))
            activation = activation.matmul(params[f"{name}.weight"].t()) + params[f"{name}.bias"]
        elif isinstance(layer, nn.ReLU):
            positive = activation.gt(0.0)
            derivatives.append(positive)
            activation = activation * positive
        elif isinstance(layer, nn.Sigmoid):
            activation = clamp(activation, LOGIT_CLAMP).sigmoid()  # CrypTen's sigmoid is garbage past ~500
            derivatives.append(activation * (1 - activation))
        else:
            raise MpcflError(f"per-example clipping supports Linear, ReLU and Sigmoid layers, not {type(layer).__name__}")
    # d(loss_i)/d(logits_i) for one example (no 1/B: this is a per-example gradient), at clamped logits
    error = output_error(clamp(activation, LOGIT_CLAMP), y)

    errors: list[Any] = []
    input_norms: list[Any] = []  # |a_i|^2 + 1 per layer
    input_widths: list[int] = []
    squared_norm = None
    for (name, layer_input), derivative in zip(reversed(inputs), [*reversed(derivatives), None]):
        errors.append(error)
        input_norms.append(layer_input.square().sum(dim=1) + 1)
        input_widths.append(layer_input.size(1))
        term = error.square().sum(dim=1) * input_norms[-1]
        squared_norm = term if squared_norm is None else squared_norm + term
        if derivative is not None:
            error = error.matmul(params[f"{name}.weight"]) * derivative
    errors.reverse()
    input_norms.reverse()
    input_widths.reverse()

    # factor = min(1, C / |g|) forced into [0, 1] by comparisons; each example is then kept only if
    # its clipped gradient provably fits, measured on the clipped errors themselves: both hold
    # whatever the 1/sqrt approximation returns, and the truncation of error x factor (up to n units
    # per entry, times inputs up to the layer's bound) is inside what is measured, not added after.
    inverse = _inverse_norm(squared_norm.div(clip**2) + 1e-4, largest=largest / clip**2, stack=stack)
    # Taken a little low, so that the check below keeps the example: 1/sqrt errs by up to 0.3%, and a
    # factor for a large gradient is a few units of 2^-16 (1/2000 is 33 of them), off by one or two.
    factor = 1 - (1 - inverse.mul(_SHRINK) + _ULPS).relu()
    factor = factor.relu().unsqueeze(1)
    scaled = [layer_error * factor for layer_error in errors]
    fits = _fits(scaled, input_norms, input_widths, clip=clip, truncation=truncation, stack=stack).unsqueeze(1)
    if weights is not None:  # a secret sample: an unselected example adds nothing
        fits = fits * weights

    sums = {}
    for (name, layer_input), layer_scaled in zip(inputs, scaled):
        kept = layer_scaled * fits
        sums[f"{name}.weight"] = kept.t().matmul(layer_input)
        sums[f"{name}.bias"] = kept.sum(dim=0)
    return sums
