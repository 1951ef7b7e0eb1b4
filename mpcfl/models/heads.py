"""The output head: the one place that knows binary from multi-class classification.

Two classes: one logit, targets a 0/1 column, a sigmoid and BCE. More: one logit per
class, targets one-hot under MPC (class indices for plain torch), a softmax and
cross-entropy. Every other module asks :func:`head_of` instead of testing ``num_classes``.
Methods named ``secure_*`` take CrypTensors, ``plain_*`` torch tensors.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
import torch

from mpcfl.models.sigmoid import DEFAULT as DEFAULT_SIGMOID
from mpcfl.models.sigmoid import SIGMOIDS, Sigmoid
from mpcfl.models.spec import TrainModel

# exp(-a) in CrypTen is (1 - a/2^8)^(2^8), which blows up for a > 256; terms this
# far out contribute < e^-40 to a loss anyway.
_EXP_FLOOR = 40.0


def _min_with(a: Any, cap: float) -> Any:
    """min(a, cap) under MPC: one comparison."""
    return a - (a - cap).relu()


class Head(abc.ABC):
    """Output size, target encoding, loss and correctness count of a classifier."""

    loss_name: str  # the job's ``training.loss`` this head trains with
    gradient_bound: float  # L2 bound on one example's d(loss)/d(logits) as output_error computes it
    bounded_error: bool = False  # output_error keeps gradient_bound for any logit (no clamp needed first)

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
    def secure_correct(self, logits: Any, y: Any) -> Any:
        """The number of correct predictions, still encrypted."""

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
        out = torch.zeros(rows, 1)
        if y is not None:
            out[:, 0] = torch.from_numpy(y).float()
        return out

    def output_error(self, logits: Any, y: Any) -> Any:
        return self.sigmoid.secure(logits) - y

    def secure_example_losses(self, logits: Any, y: Any) -> Any:
        # BCE = relu(z) - y*z + log(1 + exp(-|z|))
        magnitude = logits.abs()
        relu = (logits + magnitude).div(2)
        tail = (_min_with(magnitude, _EXP_FLOOR).neg().exp() + 1).log()
        return (relu - y * logits + tail).squeeze(1)

    def secure_correct(self, logits: Any, y: Any) -> Any:
        # Predictions and labels are 0/1, so each squared difference counts one error.
        errors = (logits.gt(0.0) - y).square().sum()
        return errors.neg() + y.size(0)

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

    def secure_correct(self, logits: Any, y: Any) -> Any:
        return (logits.argmax(dim=1, one_hot=True) * y).sum()

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


def head_of(spec: TrainModel, sigmoid: str = DEFAULT_SIGMOID) -> Head:
    """The head a model spec describes; a binary one computes its gradient with the named sigmoid
    (a training job's ``training.sigmoid``)."""
    return BinaryHead(spec.num_classes, SIGMOIDS[sigmoid]) if spec.binary else MultiClassHead(spec.num_classes)
