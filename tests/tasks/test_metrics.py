"""Reported metrics from counts opened under MPC, against the same metrics computed in plaintext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import mann_whitney
from mpcfl.models.heads import head_of
from mpcfl.models.spec import ModelSpec
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal
from mpcfl.tasks.train import metrics


def binned(probabilities: np.ndarray) -> np.ndarray:
    """Scores rounded as the thresholds see them: how many thresholds b / BINS lie below."""
    return (probabilities[..., None] > np.arange(1, metrics.BINS) / metrics.BINS).sum(-1)


@pytest.mark.parametrize("classes", [2, 3])
def test_counts_under_mpc_give_the_plaintext_metrics(crypten_single: None, classes: int) -> None:
    crypten = import_crypten()
    head = head_of(ModelSpec(type="logistic_regression", num_classes=classes))
    generator = torch.Generator().manual_seed(classes)
    n = 200
    labels = torch.randint(0, classes, (n,), generator=generator)
    logits = torch.randn(n, head.output_size, generator=generator) * 3
    logits[:, 0] += 1.5 * (labels == (1 if classes == 2 else 0)).float()  # some signal, some errors
    y = head.secure_targets(labels.numpy(), n)
    opened = reveal(metrics.secure_counts(head, crypten.cryptensor(logits), crypten.cryptensor(y)), to=[0], what="test")
    assert opened.numel() == metrics.count_size(head)
    got = metrics.derive(head, opened, n)
    probabilities = head.plain_probabilities(logits).numpy()
    predicted = probabilities.argmax(1)
    confusion = np.zeros((classes, classes), dtype=int)
    np.add.at(confusion, (labels.numpy(), predicted), 1)
    assert got["test_confusion"] == confusion.tolist()
    recall = np.diag(confusion) / confusion.sum(1)
    precision = np.diag(confusion) / confusion.sum(0)
    assert got["test_recall"] == pytest.approx(recall.mean())
    assert got["test_precision"] == pytest.approx(precision.mean())
    assert got["test_f1"] == pytest.approx((2 * precision * recall / (precision + recall)).mean())
    aucs = [mann_whitney(binned(probabilities[:, c]), labels.numpy() == c) for c in range(classes)]
    expected = aucs[1] if classes == 2 else np.mean(aucs)  # binary: class 1's; else macro one-vs-rest
    # one logit against logit thresholds is exact; several classes go through CrypTen's softmax (~1e-3 off)
    assert got["test_auc"] == pytest.approx(expected, abs=1e-9 if classes == 2 else 5e-3)
    exact = mann_whitney(probabilities[:, 1], labels.numpy() == 1) if classes == 2 else None
    if exact is not None:
        assert abs(got["test_auc"] - exact) < 0.01  # the resolution's cost, on these scores
