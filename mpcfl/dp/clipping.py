"""Clipping: feature rows in plaintext, and per-example gradients under MPC for MLPs
(Sequential Linear / ReLU / Sigmoid).

No per-example gradient is ever materialised. For a linear layer, example i's
weight gradient is the outer product of its backpropagated error d_i and its
input a_i, so its squared norm is |d_i|^2 |a_i|^2, plus |d_i|^2 for the bias
(Goodfellow, 2015). One backward pass over the batch gives every example's
total gradient norm; the clipped sum is then one matmul per layer,
``(c * d)^T a``, with c_i the example's clipping factor.

The factor min(1, C/|g_i|) needs 1/sqrt under MPC, an approximation. It is
made safe by a check that costs one comparison per example: the clipped squared
norm c_i^2 |g_i|^2 is compared with C^2 (1 + margin), and an example that fails
is dropped (factor 0). Every example's contribution is therefore bounded by
C sqrt(1 + margin), whatever the approximation does; that bound is the
sensitivity the noise is calibrated to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from mpcfl.errors import MpcflError

MARGIN = 0.01


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Scales each row down to L2 norm ``bound`` if it is longer; shorter rows are untouched."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def sensitivity(clip: float) -> float:
    """The L2 bound on one example's clipped gradient."""
    return clip * (1 + MARGIN) ** 0.5


def clipped_gradient_sum(
    model: Any, torch_model: nn.Sequential, x: Any, y: Any, *, clip: float, output_error: Callable[[Any, Any], Any],
    weights: Any | None = None,
) -> dict[str, Any]:
    """The sum over the batch of each example's gradient clipped to norm ``clip``.

    Args:
        model: the encrypted crypten model (parameters named like ``torch_model``'s).
        torch_model: the plain architecture, for the layer types.
        x: the batch's features, a CrypTensor (B x d).
        y: the batch's targets, encoded as ``output_error`` wants them.
        clip: the norm bound C.
        output_error: (logits, y) -> each example's d(loss)/d(logits), the head's
            (:meth:`mpcfl.models.heads.Head.output_error`).
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
            activation = activation.sigmoid()
            derivatives.append(activation * (1 - activation))
        else:
            raise MpcflError(f"per-example clipping supports Linear, ReLU and Sigmoid layers, not {type(layer).__name__}")
    # d(loss_i)/d(logits_i) for one example (no 1/B: this is a per-example gradient)
    error = output_error(activation, y)

    errors: list[Any] = []
    squared_norm = None
    for (name, layer_input), derivative in zip(reversed(inputs), [*reversed(derivatives), None]):
        errors.append(error)
        term = error.square().sum(dim=1) * (layer_input.square().sum(dim=1) + 1)
        squared_norm = term if squared_norm is None else squared_norm + term
        if derivative is not None:
            error = error.matmul(params[f"{name}.weight"]) * derivative
    errors.reverse()

    # factor = min(1, C / |g|), then kept only if the clipped norm provably fits.
    inverse = (squared_norm + 1e-4).inv_sqrt()
    factor = 1 - (1 - inverse * clip).relu()
    factor = factor.relu()
    fits = (factor.square() * squared_norm).le(clip**2 * (1 + MARGIN))
    factor = (factor * fits).unsqueeze(1)
    if weights is not None:
        factor = factor * weights

    sums = {}
    for (name, layer_input), layer_error in zip(inputs, errors):
        scaled = layer_error * factor
        sums[f"{name}.weight"] = scaled.t().matmul(layer_input)
        sums[f"{name}.bias"] = scaled.sum(dim=0)
    return sums
