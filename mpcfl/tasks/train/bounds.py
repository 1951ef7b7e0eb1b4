"""Fixed-point headroom: a bound on every product training computes, checked before sharing.

CrypTen encodes a value as ``round(v * 2^16)`` in a signed 64-bit ring. A product of
two encoded values is ``a * b * 2^32`` before truncation, so it (and a matmul's sum of
products) wraps silently once ``|a * b|`` reaches 2^31; a value that is only added
wraps at 2^47.

The bound is a conservative interval propagation in L2 norms, layer by layer, over
the whole run. With ``r`` a bound on every example's feature-vector norm:

- forward: ``|h_l| <= |W_l|_F |z_(l-1)| + |b_l|``; ReLU keeps the bound, a sigmoid
  layer's output norm is at most ``sqrt(width)``;
- backward: the loss gradient at the logits has norm <= 1 (BCE: ``|sigmoid - y|``;
  1.016 with ``training.sigmoid: poly``, whose output overshoots [0, 1] by that much)
  or sqrt(2) (softmax minus one-hot); ``|d_(l-1)| <= |W_l|_F |d_l|`` (x 1/4 through a
  sigmoid); a weight gradient is a batch mean of ``d z^T``, so ``|G_l|_F <= |d_l| |z_(l-1)|``;
- SGD with momentum ``m`` moves each parameter by at most ``lr / (1 - m)`` times the
  largest gradient, every step, so over ``T`` steps by ``T lr / (1 - m)`` times it.
  The gradient bounds are taken at the initial weights. For logistic regression
  that is exact: its gradient bound (|error| x |x|) does not depend on the weights,
  so the rule is a proof. For an MLP it is a rule, not a proof: each layer's
  gradient grows with the other layers' weights, and the worst case compounds over
  the steps exponentially, which would refuse every job; real training does not
  do that, and the symptom checks of :mod:`mpcfl.tasks.train.loop` catch a run that does.
  The final weights give the largest products (the last epoch's metrics run on them).

The largest product is then the largest of every layer's pre-activation norm (each
entry is a dot product), the backpropagated errors, the weight gradients, and, for
DP-SGD on an MLP, the per-example squared norms of :mod:`mpcfl.dp.clipping`.

Assumed, not bounded: CrypTen's sigmoid stays in [0, 1] (true for logits within
about +-500; the cheap ones of :mod:`mpcfl.models.sigmoid` clamp, so theirs is a
bound), and DP-SGD's Gaussian noise is left out. The symptom checks of
:mod:`mpcfl.tasks.train.loop` catch what these assumptions miss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import TrainJob
from mpcfl.models.build import build_torch_model
from mpcfl.models.heads import Head, head_of

PRODUCT_LIMIT = 2.0**31  # |a * b| at which an encoded product wraps
SUM_LIMIT = 2.0**46  # values that are only added wrap at 2^47; keep a factor two


@dataclass(frozen=True)
class Bounds:
    """What training can reach when every example's features have L2 norm <= ``input_norm``."""

    input_norm: float
    steps: int
    largest_product: float  # the largest |a * b| (or sum of products) computed under MPC
    weight: float  # any one parameter's magnitude, at any step
    logit: float  # any logit's magnitude

    def loss_sum(self, rows: int, head: Head) -> float:
        """A bound on a split's summed loss (:meth:`~mpcfl.models.heads.Head.example_loss_bound` per example)."""
        return rows * head.example_loss_bound(self.logit)


def steps(job: TrainJob, n_rows: int) -> int:
    """SGD steps in the whole run: epochs x batches per epoch."""
    return job.training.epochs * math.ceil(n_rows / job.training.batch_size)


def training_bounds(job: TrainJob, *, n_features: int, n_rows: int, input_norm: float) -> Bounds:
    """The bounds of the module docstring for this job's model, data shape and run length."""
    torch_model = build_torch_model(job.model, n_features=n_features, seed=job.training.seed)
    linears = [layer for layer in torch_model if hasattr(layer, "weight")]
    weights = [float(layer.weight.detach().norm()) for layer in linears]
    biases = [float(layer.bias.detach().norm()) for layer in linears]
    sigmoid = job.model.activation == "sigmoid"
    widths = [layer.out_features for layer in linears]
    step = job.training.learning_rate / (1 - job.training.momentum)
    error = head_of(job.model, job.training.sigmoid).gradient_bound
    dp_mlp = job.dp is not None and job.model.type == "mlp"

    def forward() -> list[float]:
        """Norm bounds of each layer's input (the features first), then of the logits."""
        norms = [input_norm]
        for i, (w, b) in enumerate(zip(weights, biases)):
            hidden = i < len(weights) - 1
            norms.append(math.sqrt(widths[i]) if hidden and sigmoid else w * norms[-1] + b)
        return norms

    def backward() -> list[float]:
        """Norm bounds of the error reaching each layer's output."""
        errors = [error]
        for i in range(len(weights) - 1, 0, -1):
            errors.insert(0, weights[i] * errors[0] * (0.25 if sigmoid else 1.0))
        return errors

    total = steps(job, n_rows)
    inputs, errors = forward(), backward()  # at the initial weights: see the module docstring
    for i in range(len(weights)):
        weights[i] += total * step * errors[i] * inputs[i]
        biases[i] += total * step * errors[i]
    inputs, errors = forward(), backward()
    pre_activations = [w * z + b for w, z, b in zip(weights, inputs, biases)]
    products = [
        *pre_activations,
        *(w * d for w, d in zip(weights, errors)),  # errors sent back through each layer
        *(d * z for d, z in zip(errors, inputs)),  # weight gradients
    ]
    if dp_mlp:  # per-example |d|^2 (|z|^2 + 1), see mpcfl.dp.clipping
        products += [d * d * (z * z + 1) for d, z in zip(errors, inputs)]
    return Bounds(
        input_norm=input_norm,
        steps=total,
        largest_product=max(products),
        weight=max(*weights, *biases),
        logit=pre_activations[-1],
    )


def safe_input_norm(job: TrainJob, *, n_features: int, n_rows: int, metric_rows: int) -> float:
    """The largest feature-vector norm that keeps training within the ring's safe range.

    Safe: every product below :data:`PRODUCT_LIMIT`, and a revealed loss sum over
    ``metric_rows`` examples below :data:`SUM_LIMIT`. The bounds grow with the norm,
    so bisection on a log scale finds it; 0 when even tiny features do not fit.
    """

    head = head_of(job.model)

    def fits(norm: float) -> bool:
        bounds = training_bounds(job, n_features=n_features, n_rows=n_rows, input_norm=norm)
        return bounds.largest_product < PRODUCT_LIMIT and bounds.loss_sum(metric_rows, head) < SUM_LIMIT

    low, high = 1e-6, math.sqrt(PRODUCT_LIMIT)
    if not fits(low):
        return 0.0
    for _ in range(30):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


class WrapAround(MpcflError):
    """A revealed value shows that fixed point wrapped: the run must not look normal."""


def check_revealed(values: torch.Tensor, *, what: str, low: Sequence[float] | float, high: Sequence[float] | float) -> None:
    """Refuses revealed values with the signs of wrap-around: NaN, infinity, or outside ``[low, high]``.

    Args:
        values: the plaintext a receiver got from :func:`mpcfl.mpc.reveal.reveal`.
        what: names the values (party and reveal) in the error.
        low, high: what the bounds allow, per entry of the flattened values, or one for all.

    Raises:
        WrapAround: the first offending entry, as one line.
    """
    flat = values.detach().double().flatten().cpu()
    lows = torch.as_tensor(low, dtype=torch.float64).expand_as(flat)
    highs = torch.as_tensor(high, dtype=torch.float64).expand_as(flat)
    bad = ~torch.isfinite(flat) | (flat < lows) | (flat > highs)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise WrapAround(
            f"{what}: revealed value {float(flat[i]):.4g} (entry {i}) is outside [{float(lows[i]):.4g}, "
            f"{float(highs[i]):.4g}], what the fixed-point bounds allow: the secure computation wrapped "
            f"around; set data.standardize: true, rescale the features, or lower training.learning_rate or "
            f"training.epochs"
        )
