"""The metrics people report, computed under MPC and opened only as counts to the metric receivers.

For a split (the test rows, or the training rows when there are none) the parties compute, still
secret-shared, and open in the epoch's one reveal:

- the confusion matrix: with one logit, [true positives, predicted positives, positives] (the rest
  follows from the row count); with several classes, ``Y^T P`` over one-hot labels and one-hot argmax;
- for the ROC curve, at each of :data:`THRESHOLDS` probability thresholds ``b / BINS``, how many
  examples score above it and how many of those are positive (per class, one-vs-rest, with several
  classes). One logit is compared with ``logit(b / BINS)``: no sigmoid under MPC.

From these counts alone the receivers derive ``test_confusion``, macro ``test_precision``,
``test_recall`` and ``test_f1``, and ``test_auc`` (macro one-vs-rest with several classes) by the
trapezoid rule over the ROC's :data:`THRESHOLDS` + 2 points: examples whose scores fall between two
thresholds count as tied, so the AUC is that of scores rounded to ``1 / BINS`` (its resolution).

A regression opens two sums instead over the scaled targets, ``sum (z - y)^2`` and the targets' spread
``sum (y - mean y)^2`` (computed under MPC as ``sum y^2 - n mean^2``: their mean is not opened), from which
``test_rmse`` (in the label's units) and ``test_r2`` follow; its ``test_mae`` comes with the loss, as a
classifier's accuracy does.

Counts of individual examples' predictions are what these metrics are; under DP they are not
released (their sensitivity is not charged here), only the noisy loss and accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mpcfl.models.heads import Head
from mpcfl.mpc.engine import import_crypten

BINS = 32  # probability thresholds b / BINS, b = 1 .. BINS - 1
THRESHOLDS = BINS - 1
_SOFTMAX_CLAMP = 32.0  # CrypTen's softmax on logits beyond +-500 is garbage; e^-32 is below fixed point


def _probabilities() -> torch.Tensor:
    return torch.arange(1, BINS, dtype=torch.float64) / BINS


def count_size(head: Head) -> int:
    """How many counts :func:`secure_counts` opens for this head."""
    if not head.classifies:
        return 2
    if head.output_size == 1:
        return 3 + 2 * THRESHOLDS
    return head.classes**2 + 2 * head.classes * THRESHOLDS


def count_range(head: Head, rows: int, logit: float) -> tuple[list[float], list[float]]:
    """What each count of :func:`secure_counts` can be over ``rows`` examples with logits within
    +-``logit``, with a 1% slack for CrypTen's approximations: outside it, fixed point wrapped."""
    slack = 0.01 * rows
    if head.classifies:
        return [-slack] * count_size(head), [rows + slack] * count_size(head)
    error, target = min(head.summary_bound(logit), head.error_clamp), head.spec.target_bound  # type: ignore[attr-defined]
    return [-slack, -slack], [rows * error**2 + slack, rows * target**2 + slack]


def _fixed_point(bits: Any, like: Any) -> Any:
    """A comparison's 0/1 result (encoded without fractional bits) in ``like``'s fixed point, so that it
    can be concatenated with it: a local scaling of the shares, no communication."""
    bits.share = bits.share * (like.encoder.scale // bits.encoder.scale)
    bits.encoder = like.encoder
    return bits


def secure_counts(head: Head, logits: Any, y: Any) -> Any:
    """The counts of the module docstring, secret-shared, flattened into one vector."""
    crypten = import_crypten()
    if not head.classifies:
        rows = y.size(0)
        mean = y.sum().div(rows)  # a division by the public row count; its square stays below the target bound's
        spread = y.square().sum() - mean.square() * rows
        return crypten.cat([head.secure_errors(logits, y).square().sum().reshape(1), spread.reshape(1)])  # type: ignore[attr-defined]
    if head.output_size == 1:
        predicted = _fixed_point(logits.gt(0.0), y)
        thresholds = torch.logit(_probabilities()).float().reshape(1, -1).to(logits.device)
        above = _fixed_point((logits - thresholds).gt(0.0), y)  # N x THRESHOLDS
        return crypten.cat([
            (predicted * y).sum().reshape(1), predicted.sum().reshape(1), y.sum().reshape(1),
            (above * y.repeat(1, THRESHOLDS)).sum(dim=0), above.sum(dim=0),
        ])
    from mpcfl.models.sigmoid import clamp_symmetric

    confusion = y.t().matmul(logits.argmax(dim=1, one_hot=True))  # true class x predicted class
    top = logits.max(dim=1, keepdim=True)[0]
    probabilities = clamp_symmetric(logits - top, _SOFTMAX_CLAMP).softmax(dim=1)  # N x classes
    thresholds = _probabilities().float().reshape(1, 1, -1).to(logits.device)
    above = _fixed_point((probabilities.unsqueeze(2) - thresholds).gt(0.0), y)  # N x classes x THRESHOLDS
    return crypten.cat([confusion.flatten(), (above * y.unsqueeze(2).repeat(1, 1, THRESHOLDS)).sum(dim=0).flatten(), above.sum(dim=0).flatten()])


def _auc(positives_above: np.ndarray, above: np.ndarray, positives: float, negatives: float) -> float:
    """The ROC's area by the trapezoid rule, from counts above increasing thresholds."""
    if positives <= 0 or negatives <= 0:
        return math.nan
    tpr = np.concatenate([[1.0], positives_above / positives, [0.0]])
    fpr = np.concatenate([[1.0], (above - positives_above) / negatives, [0.0]])
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))


def derive(head: Head, counts: torch.Tensor, rows: int, prefix: str = "test_") -> dict[str, Any]:
    """The reported metrics from the opened counts (plaintext post-processing)."""
    if not head.classifies:
        squares, spread = counts.double().cpu().tolist()
        return {
            f"{prefix}rmse": math.sqrt(max(squares, 0.0) / rows) * head.label_scale,
            f"{prefix}r2": 1.0 - squares / spread if spread > 0 else math.nan,
        }
    values = np.clip(np.rint(counts.double().cpu().numpy()), 0, rows)
    k = head.classes
    if head.output_size == 1:
        tp, predicted, positives = values[:3]
        fp, fn = predicted - tp, positives - tp
        confusion = np.array([[rows - tp - fp - fn, fp], [fn, tp]])
        aucs = [_auc(values[3 : 3 + THRESHOLDS], values[3 + THRESHOLDS :], positives, rows - positives)]
    else:
        confusion = values[: k * k].reshape(k, k)
        positives_above = values[k * k : k * k + k * THRESHOLDS].reshape(k, THRESHOLDS)
        above = values[k * k + k * THRESHOLDS :].reshape(k, THRESHOLDS)
        totals = confusion.sum(axis=1)
        aucs = [_auc(positives_above[c], above[c], totals[c], rows - totals[c]) for c in range(k)]
    hits = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(confusion.sum(axis=0) > 0, hits / confusion.sum(axis=0), 0.0)
        recall = np.where(confusion.sum(axis=1) > 0, hits / confusion.sum(axis=1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    valid = [a for a in aucs if not math.isnan(a)]
    return {
        f"{prefix}auc": float(np.mean(valid)) if valid else math.nan,
        f"{prefix}f1": float(f1.mean()),
        f"{prefix}precision": float(precision.mean()),
        f"{prefix}recall": float(recall.mean()),
        f"{prefix}confusion": confusion.astype(int).tolist(),
    }
