"""The output head: the one place that knows binary from multi-class classification and regression.

Two classes: one logit, targets a 0/1 column, a sigmoid and BCE. More: one logit per
class, targets one-hot under MPC (class indices for plain torch), a softmax and
cross-entropy. Regression: one output, the (scaled) target as a column, MSE or Huber.
Every other module asks :func:`head_of` (or :func:`job_head`) instead of testing ``num_classes``
or the loss. Methods named ``secure_*`` take CrypTensors, ``plain_*`` torch tensors.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Protocol

import numpy as np
import torch

from mpcfl.models.sigmoid import DEFAULT as DEFAULT_SIGMOID
from mpcfl.models.sigmoid import SIGMOIDS, Sigmoid
from mpcfl.models.spec import Regression, TrainModel

# exp(-a) in CrypTen is (1 - a/2^8)^(2^8), which blows up for a > 256; terms this
# far out contribute < e^-40 to a loss anyway.
_EXP_FLOOR = 40.0


def _min_with(a: Any, cap: float) -> Any:
    """min(a, cap) under MPC: one comparison."""
    return a - (a - cap).relu()


def _column(y: np.ndarray | None, rows: int) -> torch.Tensor:
    """One target per row as a column (zeros where this party holds no labels)."""
    out = torch.zeros(rows, 1)
    if y is not None:
        out[:, 0] = torch.from_numpy(y).float()
    return out


class Head(abc.ABC):
    """Output size, target encoding, loss and per-example summary (a hit, or an absolute error)."""

    loss_name: str  # the job's ``training.loss`` this head trains with
    gradient_bound: float  # L2 bound on one example's d(loss)/d(logits) as output_error computes it
    bounded_error: bool = False  # output_error keeps gradient_bound for any logit (no clamp needed first)
    summary: str = "accuracy"  # what the mean of secure_summaries is, beside the loss, in metrics.json
    classifies: bool = True
    label_scale: float = 1.0  # a regression's target units per scaled unit (errors are reported in the label's units)

    def __init__(self, classes: int) -> None:
        self.classes = classes

    @property
    @abc.abstractmethod
    def output_size(self) -> int:
        """Logits per example."""

    @abc.abstractmethod
    def example_loss_bound(self, logit: float) -> float:
        """A bound on one example's loss when every logit lies within +-``logit``."""

    @abc.abstractmethod
    def secure_targets(self, y: np.ndarray | None, rows: int) -> torch.Tensor:
        """Labels as the secure loss wants them (zeros where this party holds no labels)."""

    @abc.abstractmethod
    def output_error(self, logits: Any, y: Any) -> Any:
        """One example's d(loss)/d(logits), per row (no 1/B)."""

    @abc.abstractmethod
    def secure_example_losses(self, logits: Any, y: Any) -> Any:
        """Each example's loss for reporting, accurate to about 1e-3.

        CrypTen's own losses take log(p) of a probability with its ``input_in_01``
        approximation, which is off by ~0.04 at p=1, so a well-fitted model reports
        twice its true loss. Here log only sees arguments in [1, classes], where
        CrypTen's general log is accurate.
        """

    @abc.abstractmethod
    def secure_summaries(self, logits: Any, y: Any) -> Any:
        """Per example, 1 for a correct prediction and 0 otherwise (a regression: its absolute error), still encrypted."""

    def summary_bound(self, logit: float) -> float:
        """A bound on one example's summary when every logit lies within +-``logit``."""
        return 1.0

    def plain_scores(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The split's ``summary`` (and a regression's R^2 and RMSE) in plain torch, in the label's units."""
        return {"accuracy": float(self.plain_hits(logits, y).float().mean())}

    @abc.abstractmethod
    def plain_targets(self, y: np.ndarray) -> torch.Tensor:
        """Labels as plain torch's loss wants them."""

    @abc.abstractmethod
    def plain_loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Plain torch's loss, the reference for the secure one."""

    @abc.abstractmethod
    def plain_hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example, whether the prediction is correct (bool)."""

    @abc.abstractmethod
    def log_odds(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example, log(p / (1 - p)) of the true label, in float64."""

    @abc.abstractmethod
    def plain_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per example, each class's probability (N x classes); the prediction is the largest."""


class BinaryHead(Head):
    """One logit, a sigmoid, BCE; the gradient's sigmoid is ``sigmoid`` (:mod:`mpcfl.models.sigmoid`)."""

    loss_name = "bce"

    def __init__(self, classes: int, sigmoid: Sigmoid = SIGMOIDS[DEFAULT_SIGMOID]) -> None:
        super().__init__(classes)
        self.sigmoid = sigmoid
        self.gradient_bound = sigmoid.error_bound  # |p - y|: 1 for CrypTen's (logits within +-500)
        self.bounded_error = sigmoid.clamps

    @property
    def output_size(self) -> int:
        return 1

    def example_loss_bound(self, logit: float) -> float:
        return logit + math.log(self.classes)

    def secure_targets(self, y: np.ndarray | None, rows: int) -> torch.Tensor:
        return _column(y, rows)

    def output_error(self, logits: Any, y: Any) -> Any:
        return self.sigmoid.secure(logits) - y

    def secure_example_losses(self, logits: Any, y: Any) -> Any:
        # BCE = relu(z) - y*z + log(1 + exp(-|z|))
        magnitude = logits.abs()
        relu = (logits + magnitude).div(2)
        tail = (_min_with(magnitude, _EXP_FLOOR).neg().exp() + 1).log()
        return (relu - y * logits + tail).squeeze(1)

    def secure_summaries(self, logits: Any, y: Any) -> Any:
        # Predictions and labels are 0/1, so each squared difference is one error.
        return ((logits.gt(0.0) - y).square().neg() + 1).squeeze(1)

    def plain_targets(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y).float().reshape(-1, 1)

    def plain_loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction=reduction)

    def plain_hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((logits > 0).float() == y).squeeze(1)

    def log_odds(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # log(p/(1-p)) of the true label is its signed logit
        return torch.where(y > 0.5, logits, -logits).squeeze(1).double()

    def plain_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        positive = torch.sigmoid(logits.double())
        return torch.cat([1 - positive, positive], dim=1)


class MultiClassHead(Head):
    """One logit per class, a softmax, cross-entropy."""

    loss_name = "cross_entropy"
    gradient_bound = math.sqrt(2.0)  # |softmax - one-hot| <= sqrt(2)

    @property
    def output_size(self) -> int:
        return self.classes

    def example_loss_bound(self, logit: float) -> float:
        return 2 * logit + math.log(self.classes)

    def secure_targets(self, y: np.ndarray | None, rows: int) -> torch.Tensor:
        out = torch.zeros(rows, self.classes)
        if y is not None:
            out[torch.arange(rows), torch.from_numpy(y)] = 1.0
        return out

    def output_error(self, logits: Any, y: Any) -> Any:
        return logits.softmax(dim=1) - y

    def secure_example_losses(self, logits: Any, y: Any) -> Any:
        # logsumexp(z) - z[y], logsumexp shifted by the row max
        top = logits.max(dim=1, keepdim=True)[0]
        shifted = _min_with(top - logits, _EXP_FLOOR).neg()
        logsumexp = top.squeeze(1) + shifted.exp().sum(dim=1).log()
        return logsumexp - (logits * y).sum(dim=1)

    def secure_summaries(self, logits: Any, y: Any) -> Any:
        return (logits.argmax(dim=1, one_hot=True) * y).sum(dim=1)

    def plain_targets(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y).long()

    def plain_loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)

    def plain_hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1) == y

    def log_odds(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.double(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        return log_p - torch.log((-torch.expm1(log_p)).clamp_min(1e-300))  # 1 - p, clamped once positive

    def plain_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double(), dim=1)


class RegressionHead(Head):
    """One output, fitted to the scaled target ``(y - center) / scale`` with MSE or Huber.

    The gradient of MSE, ``2 (z - y)``, grows with the error: its bound is a rule taken at the
    initial weights (outputs near 0, targets within ``target_bound``), like an MLP's bounds in
    :mod:`mpcfl.tasks.train.bounds`. Huber's, ``clamp(z - y, -delta, delta)``, is bounded for any
    output, which DP-SGD needs. Scores are mapped back to the label column's units by ``scale``.
    """

    summary = "mae"
    classifies = False
    error_clamp = 2.0**15  # |z - y| squared for losses and metrics: its square stays below 2^31, whatever z

    def __init__(self, spec: Regression) -> None:
        super().__init__(1)
        self.spec = spec
        self.label_scale = spec.scale
        self.loss_name = spec.loss
        huber = spec.loss == "huber"
        self.bounded_error = huber
        self.gradient_bound = spec.huber_delta if huber else 2 * (spec.target_bound + 1)

    @property
    def output_size(self) -> int:
        return 1

    def example_loss_bound(self, logit: float) -> float:
        error = min(logit + self.spec.target_bound, self.error_clamp)
        return self.spec.huber_delta * error if self.spec.loss == "huber" else error**2

    def summary_bound(self, logit: float) -> float:
        return logit + self.spec.target_bound

    def secure_targets(self, y: np.ndarray | None, rows: int) -> torch.Tensor:
        return _column(y, rows)

    def output_error(self, logits: Any, y: Any) -> Any:
        error = logits - y
        if self.spec.loss == "huber":
            delta = self.spec.huber_delta
            return error - (error - delta).relu() + (error.neg() - delta).relu()  # clamp to +-delta
        return error * 2

    def secure_errors(self, logits: Any, y: Any) -> Any:
        """``z - y`` clamped to +-:attr:`error_clamp`, so that squaring it cannot wrap fixed point (a
        prediction that far off is reported as that far off)."""
        error = logits - y
        return error - (error - self.error_clamp).relu() + (error.neg() - self.error_clamp).relu()

    def secure_example_losses(self, logits: Any, y: Any) -> Any:
        error = self.secure_errors(logits, y)
        if self.spec.loss == "mse":
            return error.square().squeeze(1)
        magnitude = error.abs()
        inside = _min_with(magnitude, self.spec.huber_delta)  # m = min(|e|, delta): m (|e| - m / 2)
        return (inside * (magnitude - inside.div(2))).squeeze(1)

    def secure_summaries(self, logits: Any, y: Any) -> Any:
        return (logits - y).abs().squeeze(1)

    def plain_targets(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).reshape(-1, 1)

    def plain_loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.spec.loss == "huber":
            loss = torch.nn.functional.huber_loss(logits, y, reduction="none", delta=self.spec.huber_delta)
        else:
            loss = torch.nn.functional.mse_loss(logits, y, reduction="none")
        loss = loss.squeeze(1)
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss

    def plain_hits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError("a regression has no hits; see plain_scores")

    def plain_scores(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return regression_scores(
            self.to_label_units(logits).squeeze(1).double(), self.to_label_units(y).squeeze(1).double()
        )

    def to_label_units(self, values: torch.Tensor) -> torch.Tensor:
        """Scaled outputs or targets back in the label column's units."""
        return values * self.spec.scale + self.spec.center

    def log_odds(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError("a regression has no log-odds")

    def plain_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise TypeError("a regression predicts values, not probabilities")


def regression_scores(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE and R^2 (1 - residual / total sum of squares) of ``predicted`` against ``target``."""
    residual = predicted - target
    total = float(((target - target.mean()) ** 2).sum())
    return {
        "mae": float(residual.abs().mean()),
        "rmse": float(residual.pow(2).mean().sqrt()),
        "r2": 1.0 - float(residual.pow(2).sum()) / total if total > 0 else math.nan,
    }


def head_of(spec: TrainModel, sigmoid: str = DEFAULT_SIGMOID, *, regression: Regression | None = None) -> Head:
    """The head a model spec describes: a regression's when given its numbers, else a classifier's; a
    binary one computes its gradient with the named sigmoid (a training job's ``training.sigmoid``)."""
    if regression is not None:
        return RegressionHead(regression)
    return BinaryHead(spec.num_classes, SIGMOIDS[sigmoid]) if spec.binary else MultiClassHead(spec.num_classes)


class _Job(Protocol):
    model: Any
    training: Any


def job_head(job: _Job, *, gradient: bool = False) -> Head:
    """A training job's head (``training.loss``, ``labels.scaling``); with ``gradient``, the one its
    gradient uses (``training.sigmoid``), else exact sigmoids for metrics and references."""
    sigmoid = getattr(job.training, "sigmoid", DEFAULT_SIGMOID) if gradient else DEFAULT_SIGMOID
    return head_of(job.model, sigmoid, regression=getattr(job, "regression", None))
