"""DP-SGD under MPC: logistic regression by feature clipping, MLPs by per-example clipping.

Sensitivity without per-step clipping: each party scales its own slice of every
row to L2 norm at most ``clip / sqrt(k)`` (k = parties holding feature columns),
exactly and in plaintext, before sharing. Every row then has norm at most
``clip``, and a logistic-regression gradient ``(p - y) [x, 1]`` has norm at most
``sqrt(clip^2 + 1)`` (times sqrt(2) for softmax), since ``|p - y| <= 1``. A 1%
margin covers CrypTen's sigmoid approximation (measured error < 0.002, outputs
within [0, 1]).

Each step, every party adds an integer noise share to its arithmetic share of
the mean gradient (no communication), sized so that the honest parties' noise on
the summed gradient has standard deviation ``noise_multiplier x sensitivity``.
Batches are disjoint slices of a public permutation, so any one record is in one
step per epoch and nobody's batch membership is secret: the accountant composes
one Gaussian mechanism per epoch, with no amplification by subsampling.

An MLP's gradients are not bounded by its features, so each example's gradient
is clipped to ``clip`` inside MPC instead (:mod:`mpcfl.dp.clipping`), and the
noise goes on the clipped sum.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from mpcfl.jobs.schema import TrainJob
from mpcfl.dp import clipping
from mpcfl.dp.accountant import Charge, calibrate_noise_multiplier
from mpcfl.dp.noise import add_noise_share, noise_share
from mpcfl.mpc.prng import numpy_generator
from mpcfl.errors import MpcflError
from mpcfl.mpc.reveal import Privacy

log = logging.getLogger(__name__)

_APPROXIMATION_MARGIN = 1.01


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Scales each row down to L2 norm ``bound`` if it is longer; shorter rows are untouched."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def clip_party_features(job: TrainJob, part: Any, feature_counts: list[int]) -> None:
    """Clips one party's slice of every train and test row to ``dp.clip / sqrt(k)``, in place.

    Args:
        part: the party's :class:`mpcfl.data.party.PartyData`.
        feature_counts: every party's number of feature columns (public).
    """
    bound = job.dp.clip / math.sqrt(feature_parties(job, feature_counts))
    for split in (part.train, part.test):
        if split is not None and split.x.shape[1]:
            split.x = clip_rows(split.x, bound)


def clips_features(job: TrainJob) -> bool:
    """Logistic regression bounds its gradients by clipping features before sharing;
    an MLP clips each example's gradient inside MPC (:mod:`mpcfl.dp.clipping`)."""
    return job.model.type == "logistic_regression"


def feature_parties(job: TrainJob, columns: list[int]) -> int:
    """k: how many parties hold part of each row (columns[i] = party i's feature count)."""
    return sum(1 for c in columns if c > 0) if job.partition == "vertical" else 1


def metrics_charge(job: TrainJob) -> tuple[Charge, float] | None:
    """The charge for one epoch's metrics and the noise scale it pays for, if the job releases them.

    One record moves the revealed [loss sums, correct counts] by at most the clipped
    loss bound L in one loss entry and 1 in one count: L2 sensitivity sqrt(L^2 + 1),
    L1 sensitivity L + 1 (it is a train or a test record, never both).
    """
    assert job.dp is not None
    spec = job.dp.metrics
    if spec is None:
        return None
    bound = spec.loss_bound
    sensitivity = math.sqrt(bound**2 + 1) if spec.mechanism == "gaussian" else bound + 1
    return Charge(spec.mechanism, spec.noise_multiplier), spec.noise_multiplier * sensitivity


def calibration(job: TrainJob) -> tuple[float, float]:
    """DP-SGD's noise multiplier and per-example L2 sensitivity.

    The multiplier is the smallest that keeps the model, plus any per-epoch metrics,
    within the job's (epsilon, delta).

    Raises:
        MpcflError: the metrics alone would spend the whole budget.
    """
    assert job.dp is not None
    if clips_features(job):
        sensitivity = _APPROXIMATION_MARGIN * math.sqrt(job.dp.clip**2 + 1)
        if job.model.num_classes > 2:
            sensitivity *= math.sqrt(2)
    else:
        sensitivity = clipping.sensitivity(job.dp.clip)
    metrics = metrics_charge(job)
    epochs = job.training.epochs
    extra = [] if metrics is None else [Charge(metrics[0].mechanism, metrics[0].noise_multiplier, epochs)]
    try:
        noise_multiplier = calibrate_noise_multiplier(
            epsilon=job.dp.epsilon, delta=job.dp.delta, count=epochs, accountant=job.dp.accountant, extra=extra
        )
    except ValueError as err:
        raise MpcflError(f"{job.source}: dp.metrics: {err}; raise dp.metrics.noise_multiplier") from None
    return noise_multiplier, sensitivity


class DpSgd:
    """Noise for each step and the charge for revealing the trained model."""

    def __init__(self, job: TrainJob) -> None:
        assert job.dp is not None
        self.job = job
        self.noise_multiplier, self.sensitivity = calibration(job)
        self.generator = numpy_generator()
        log.info(
            "DP-SGD: noise multiplier %.4g for epsilon %g, delta %g over %d epochs; sensitivity %.4g",
            self.noise_multiplier, job.dp.epsilon, job.dp.delta, job.training.epochs, self.sensitivity,
        )

    def noise_gradients(self, parameters: list[Any], batch_size: int) -> None:
        """Adds this party's noise share to each parameter's mean gradient, in place."""
        for param in parameters:
            self._add_noise(param.grad, self.noise_multiplier * self.sensitivity / batch_size)

    def set_noisy_mean(self, parameters: dict[str, Any], sums: dict[str, Any], batch_size: int) -> None:
        """Sets each parameter's gradient to its noisy clipped sum over the batch, divided by the batch size."""
        for name, param in parameters.items():
            total = sums[name]
            self._add_noise(total, self.noise_multiplier * self.sensitivity)
            param.grad = total.div(batch_size)

    def _add_noise(self, value: Any, sigma: float) -> None:
        share = noise_share(
            "gaussian", tuple(value.size()), sigma, parties=self.job.world_size, colluders=self.job.colluders,
            fixed_point=value.encoder.scale, generator=self.generator,
        )
        add_noise_share(value, share)

    def metrics_privacy(self) -> Privacy | None:
        """Noise and charge for one epoch's metrics, or None when the job does not release them."""
        metrics = metrics_charge(self.job)
        if metrics is None:
            return None
        return Privacy(charge=metrics[0], scale=metrics[1], colluders=self.job.colluders)

    def model_privacy(self) -> Privacy:
        """The model is post-processing of the noisy steps: it charges, but adds no noise."""
        return Privacy(charge=Charge("gaussian", self.noise_multiplier, self.job.training.epochs))

    def summary(self) -> dict[str, float]:
        return {"noise_multiplier": self.noise_multiplier, "sensitivity": self.sensitivity,
                "colluders": self.job.colluders}
