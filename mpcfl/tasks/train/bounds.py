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

A factory's module (``model.factory``) is bounded the same way, read as a chain of
Linear and Conv layers from its torch.fx graph: a conv layer counts how many windows
each input entry falls in (:class:`_Layer`), pooling its operator norm, a layout
change (flatten, unflatten, view) nothing. A graph that branches (a residual
connection) is refused: its norms add along paths, not implemented here.

The largest product is then the largest of every layer's pre-activation norm (each
entry is a dot product), the backpropagated errors and the weight gradients.

Assumed, not bounded: CrypTen's sigmoid stays in [0, 1] (true for logits within
about +-500; the cheap ones of :mod:`mpcfl.models.sigmoid` clamp, so theirs is a
bound), and DP-SGD's Gaussian noise is left out. The symptom checks of
:mod:`mpcfl.tasks.train.loop` catch what these assumptions miss.

DP-SGD on an MLP is the exception, where a rule is not enough: its clip must hold
for any data and any weights the run can reach, so its features are clamped, its
parameters projected, and its bounds are per-entry and public
(:mod:`mpcfl.dp.clipping`, :func:`dp_mlp_headroom`), never the data's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from mpcfl.dp import clipping
from mpcfl.dp.sampling import poisson_rate
from mpcfl.errors import ConfigError, MpcflError
from mpcfl.jobs.schema import TrainJob
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.convert import UnsupportedModelError
from mpcfl.models.heads import Head, job_head
from mpcfl.models.spec import ModelSpec

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


@dataclass
class _Layer:
    """One parametrised layer (Linear or Conv) and what follows it up to the next one.

    A conv layer's output norm is at most ``spread * |W|_F * |x| + positions * |b|``:
    each input entry falls in at most ``spread^2`` windows, and the bias is added at
    ``positions^2`` places per channel. Its transpose (the backward pass) has the same
    bound, and a weight gradient (a sum over windows) has norm at most ``spread |d| |x|``.
    For a Linear layer the spread is 1, and the positions 1 on flat rows.
    """

    weight: float
    bias: float
    spread: float = 1.0
    positions: float = 1.0
    after: list[tuple[str, float]] = field(default_factory=list)  # ("set" | "cap" | "gain", value), in order
    slope: float = 1.0  # how much the nodes after it can grow an error sent back through them
    weight_entries: int = 0
    bias_entries: int = 0


def _windows(kernel: Any, stride: Any, dilation: Any) -> float:
    """The most windows one input entry falls in: prod ceil(k/s) (k with dilation)."""
    dims = len(kernel) if isinstance(kernel, tuple) else 2
    kernel, stride, dilation = ((v,) * dims if isinstance(v, int) else tuple(v) for v in (kernel, stride, dilation))
    return math.prod(k if d > 1 else math.ceil(k / s) for k, s, d in zip(kernel, stride, dilation))


def _linear_pool_gain(layer: nn.Module, shape: torch.Size) -> float:
    """An average pool's operator norm bound, by Schur's test on its nonnegative matrix:
    sqrt(largest row sum x largest column sum), read off one forward and backward on ones."""
    ones = torch.ones(shape, requires_grad=True)
    out = layer(ones)
    out.sum().backward()
    return math.sqrt(float(out.detach().max()) * float(ones.grad.max()))


# Nodes that change no norm: layout only.
_LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_LAYOUT_CALLS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}


def _chain(torch_model: nn.Module, n_features: int) -> tuple[float, list[_Layer], float]:
    """The model as a chain: the input's gain up to the first layer, the layers, and the
    gain after the last one (towards the logits).

    Raises:
        MpcflError: the graph branches, or a node has no norm rule here.
    """
    gm = torch.fx.symbolic_trace(torch_model)
    ShapeProp(gm).propagate(torch.zeros(1, n_features))
    layers: list[_Layer] = []
    pre = 1.0
    previous = None

    def note(kind: str, value: float, slope: float) -> None:
        nonlocal pre
        if layers:
            layers[-1].after.append((kind, value))
            layers[-1].slope *= slope
        elif kind == "gain":
            pre *= value
        else:
            raise MpcflError("the model applies an activation before its first Linear or Conv layer; "
                             "fixed-point bounds for that are not implemented")

    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            previous = node
        if node.op in ("placeholder", "output") or not isinstance(meta, TensorMetadata):
            continue  # sizes and other plain values
        inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get("tensor_meta"), TensorMetadata)]
        if inputs != [previous]:
            raise MpcflError(
                f"node {node.name} combines several tensors: fixed-point bounds cover chains of layers "
                "(no residual connections) for now"
            )
        previous = node
        width = math.prod(meta.shape[1:])
        layer = gm.get_submodule(node.target) if node.op == "call_module" else None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            conv = not isinstance(layer, nn.Linear)
            spread = math.sqrt(_windows(layer.kernel_size, layer.stride, layer.dilation)) if conv else 1.0
            # a Linear layer on (N, ..., d) rows adds its bias at every position too
            positions = math.sqrt(width / (layer.out_channels if conv else layer.out_features))
            bias = 0.0 if layer.bias is None else float(layer.bias.detach().norm())
            layers.append(_Layer(
                float(layer.weight.detach().norm()), bias, spread, positions,
                weight_entries=layer.weight.numel(), bias_entries=0 if layer.bias is None else layer.bias.numel(),
            ))
        elif isinstance(layer, nn.ReLU) or name == "relu":
            note("gain", 1.0, 1.0)
        elif isinstance(layer, nn.Sigmoid) or name == "sigmoid":
            note("set", math.sqrt(width), 0.25)  # every output in [0, 1]
        elif isinstance(layer, nn.Tanh) or name == "tanh":
            note("cap", math.sqrt(width), 1.0)  # |tanh(v)| <= min(|v|, 1)
        elif isinstance(layer, nn.MaxPool2d):
            gain = math.sqrt(_windows(layer.kernel_size, layer.stride or layer.kernel_size, layer.dilation))
            note("gain", gain, gain)
        elif isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            gain = _linear_pool_gain(layer, inputs[0].meta["tensor_meta"].shape)
            note("gain", gain, gain)
        elif isinstance(layer, _LAYOUT_MODULES) or name in _LAYOUT_CALLS:
            note("gain", 1.0, 1.0)
        else:
            raise MpcflError(f"node {node.name} ({type(layer).__name__ if layer else name}): no fixed-point "
                             "bound rule for it in training")
    if not layers:
        raise MpcflError("the model has no Linear or Conv layer to train")
    post = math.prod(v for kind, v in layers[-1].after if kind == "gain")
    return pre, layers, post


def _model_chain(job: TrainJob, n_features: int) -> tuple[float, list[_Layer], float]:
    try:
        return _chain(build_torch_model(job.model, n_features=n_features, seed=job.training.seed), n_features)
    except MpcflError as err:
        where = "" if str(err).startswith("model.") else f"model.factory: {getattr(job.model, 'factory', '')}: "
        raise MpcflError(f"{where}{err}") from None


def check_model(job: TrainJob, n_features: int) -> None:
    """Refuses, before anything is shared, a model that does not take rows of ``n_features``,
    gives the wrong number of logits, or cannot be trained or bounded under MPC (for DP-SGD
    on an MLP: whose per-example clip could not hold, :func:`dp_mlp_headroom`).

    Raises:
        ConfigError: one line naming the job file and the key.
    """
    try:
        _model_chain(job, n_features)
        model = build_torch_model(job.model, n_features=n_features, seed=job.training.seed)
        to_crypten(model)
    except UnsupportedModelError as err:
        raise ConfigError(f"{job.source}: model.factory: {err}") from None
    except MpcflError as err:
        raise ConfigError(f"{job.source}: {err}") from None
    if _dp_mlp(job):
        dp_mlp_headroom(job, n_features)


def _dp_mlp(job: TrainJob) -> bool:
    """DP-SGD by per-example clipping: its bounds are public (:mod:`mpcfl.dp.clipping`), not the data's."""
    return job.dp is not None and isinstance(job.model, ModelSpec) and job.model.type == "mlp"


def dp_mlp_headroom(job: TrainJob, n_features: int) -> float:
    """How far DP-SGD's per-example clipping stays from wrapping, for features within
    ``data.max_abs`` and parameters within ``dp.weight_bound``: any data, any reachable weights.

    Raises:
        ConfigError: names the job file, the layer and what to lower.
    """
    assert job.dp is not None
    model = build_torch_model(job.model, n_features=n_features, seed=job.training.seed)
    error = job_head(job, gradient=True).gradient_bound
    try:
        layers = clipping.layer_bounds(
            model, input_bound=job.data.max_abs, weight_bound=job.dp.weight_bound, error_bound=error
        )
        return clipping.check_bounds(layers, weight_bound=job.dp.weight_bound, batch=job.training.batch_size)
    except MpcflError as err:
        raise ConfigError(f"{job.source}: dp: {err}") from None


def training_bounds(job: TrainJob, *, n_features: int, n_rows: int, input_norm: float) -> Bounds:
    """The bounds of the module docstring for this job's model, data shape and run length."""
    return _bounds(job, _model_chain(job, n_features), n_rows=n_rows, input_norm=input_norm)


def _bounds(job: TrainJob, chain: tuple[float, list[_Layer], float], *, n_rows: int, input_norm: float) -> Bounds:
    pre, layers, post = chain
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    step = job.training.learning_rate / (1 - job.training.momentum)
    if job.dp is not None and job.dp.sampling == "poisson":  # a step's sum over q n: up to 1/q means, if all rows join
        step /= poisson_rate(job.training.batch_size, n_rows)
    error = job_head(job, gradient=True).gradient_bound * post
    dp_mlp = _dp_mlp(job)

    def activate(norm: float, layer: _Layer) -> float:
        for kind, value in layer.after:
            norm = value if kind == "set" else min(norm, value) if kind == "cap" else norm * value
        return norm

    def pre_activation(i: int, z: float) -> float:
        return layers[i].spread * weights[i] * z + layers[i].positions * biases[i]

    def forward() -> list[float]:
        """Norm bounds of each layer's input (the features first), then of the logits."""
        norms = [input_norm * pre]
        for i in range(len(layers)):
            hidden = i < len(layers) - 1
            norms.append(activate(pre_activation(i, norms[-1]), layers[i]) if hidden else pre_activation(i, norms[-1]))
        return norms

    def backward() -> list[float]:
        """Norm bounds of the error reaching each layer's output."""
        errors = [error]
        for i in range(len(layers) - 1, 0, -1):
            errors.insert(0, layers[i].spread * weights[i] * errors[0] * layers[i - 1].slope)
        return errors

    total = steps(job, n_rows)
    if dp_mlp:  # every parameter is projected to +-dp.weight_bound: a bound for any step, not a rule
        assert job.dp is not None
        bound = job.dp.weight_bound
        weights = [bound * math.sqrt(layer.weight_entries) for layer in layers]
        biases = [bound * math.sqrt(layer.bias_entries) for layer in layers]
    else:
        inputs, errors = forward(), backward()  # at the initial weights: see the module docstring
        for i, layer in enumerate(layers):
            weights[i] += total * step * layer.spread * errors[i] * inputs[i]
            biases[i] += total * step * layer.positions * errors[i]
    inputs, errors = forward(), backward()
    pre_activations = [pre_activation(i, z) for i, z in enumerate(inputs[:-1])]
    products = [
        *pre_activations,
        *(layer.spread * w * d for layer, w, d in zip(layers, weights, errors)),  # errors sent back through each layer
        *(layer.spread * d * z for layer, d, z in zip(layers, errors, inputs)),  # weight gradients
    ]
    return Bounds(
        input_norm=input_norm,
        steps=total,
        largest_product=max(products),
        weight=job.dp.weight_bound if dp_mlp else max(*weights, *biases),
        logit=pre_activations[-1] * post,
    )


def safe_input_norm(job: TrainJob, *, n_features: int, n_rows: int, metric_rows: int) -> float:
    """The largest feature-vector norm that keeps training within the ring's safe range.

    Safe: every product below :data:`PRODUCT_LIMIT`, and a revealed loss sum over
    ``metric_rows`` examples below :data:`SUM_LIMIT`. For DP-SGD on an MLP, the norm
    its feature clamp allows (its bounds are checked by :func:`dp_mlp_headroom`). The bounds grow with the norm,
    so bisection on a log scale finds it; 0 when even tiny features do not fit.
    """

    if _dp_mlp(job):  # features are clamped to data.max_abs, and dp_mlp_headroom proved that safe
        return job.data.max_abs * math.sqrt(n_features)
    head = job_head(job)
    chain = _model_chain(job, n_features)

    def fits(norm: float) -> bool:
        bounds = _bounds(job, chain, n_rows=n_rows, input_norm=norm)
        # a regression's metrics sum each error squared, clamped first (RegressionHead.secure_errors)
        squared = 0.0 if head.classifies else min(head.summary_bound(bounds.logit), head.error_clamp) ** 2  # type: ignore[attr-defined]
        return bounds.largest_product < PRODUCT_LIMIT and max(bounds.loss_sum(metric_rows, head), metric_rows * squared) < SUM_LIMIT

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
