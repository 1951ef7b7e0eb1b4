"""DP-SGD under MPC: logistic regression by feature clipping, MLPs by per-example clipping.

Sensitivity without per-step clipping: each party scales its own slice of every
row to L2 norm at most ``clip / sqrt(k)`` (k = parties holding feature columns),
exactly and in plaintext, before sharing. Every row then has norm at most
``clip``, and a logistic-regression gradient ``(p - y) [x, 1]`` has norm at most
``sqrt(clip^2 + 1)`` (times sqrt(2) for softmax), since ``|p - y| <= 1``. A 1%
margin covers CrypTen's sigmoid approximation (measured error < 0.002, outputs
within [0, 1]) and fixed-point rounding. With a cheap ``training.sigmoid``
(:mod:`mpcfl.models.sigmoid`) the bound is that approximation's own: it clamps its
input, so ``|p - y|`` stays within its range for every logit (``poly``: 1.016).

Neighbouring datasets differ by replacing one record (one row of one party; in a
vertical split, one patient across all parties): row counts are public and the
batches come from a public permutation of the n rows, so removing a record would
reshuffle every batch, and replace-one (same n) is the relation that holds. One
record then moves a step's summed clipped gradient by up to twice its bound
(:func:`mpcfl.dp.accountant.replace_one`), and that is the sensitivity.

Each step, every party adds an integer noise share to its arithmetic share of
the mean gradient (no communication), sized so that the honest parties' noise on
the summed gradient has standard deviation ``noise_multiplier x sensitivity``.
Batches are disjoint slices of a public permutation, so any one record is in one
step per epoch and nobody's batch membership is secret: the accountant composes
one Gaussian mechanism per epoch, with no amplification by subsampling (that
would need batches drawn by secret Poisson masks inside MPC, not built). Each
epoch is charged when it completes, before any release that depends on it.

An MLP's gradients are not bounded by its features, so each example's gradient
is clipped to ``clip`` inside MPC instead (:mod:`mpcfl.dp.clipping`), and the
noise goes on the clipped sum.

With ``dp.sampling: poisson`` the batches are secret instead: each step includes
each row with probability q = batch_size / n, by bits drawn jointly under MPC and
never opened (:mod:`mpcfl.mpc.sampling`), round(1/q) steps per epoch. A step runs
over all n rows, each example's term multiplied by its secret bit, and divides by
the public expected batch size q n, never by the real one, so nothing about the
selection is opened: not a bit, not the batch size, and the work done is the same
whatever the bits. Amplification by subsampling then holds, and the accountant
composes one Poisson-subsampled Gaussian per step under add/remove neighbours
(one record more or less): the summed clipped gradient moves by at most one
example's bound, not twice it. The row count n stays public, as it is here for
every job: add/remove is the relation the sampled mechanism is analysed under
(as in Abadi et al. 2016 and the DP-SGD libraries), not a promise that n is hidden.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from mpcfl.dp import clipping
from mpcfl.dp.accountant import Charge, calibrate_noise_multiplier, replace_one
from mpcfl.dp.budget import check_parameters
from mpcfl.dp.noise import add_noise_share, noise_share
from mpcfl.dp.sampling import poisson_rate, poisson_steps
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import FederatedJob, TrainJob
from mpcfl.models.heads import Head, head_of
from mpcfl.models.sigmoid import clamp_symmetric
from mpcfl.mpc.compat import import_crypten
from mpcfl.mpc.prng import SecureGenerator, numpy_generator
from mpcfl.mpc.reveal import Privacy
from mpcfl.mpc.sampling import Selection, inclusion_bits
from mpcfl.tasks.train.steps import PlainSgd, TrainingStep

log = logging.getLogger(__name__)

_APPROXIMATION_MARGIN = 1.01


def clips_features(job: TrainJob) -> bool:
    """DP logistic regression bounds its gradients by clipping features before sharing;
    an MLP clips each example's gradient inside MPC (:mod:`mpcfl.dp.clipping`)."""
    return job.dp is not None and job.model.type == "logistic_regression"


def bound_features(job: TrainJob, part: Any, feature_counts: list[int]) -> None:
    """For DP logistic regression, clips one party's slice of every train and test row
    to ``dp.clip / sqrt(k)``, in place; any other job's data is left alone.

    Args:
        part: the party's :class:`mpcfl.data.party.PartyData`.
        feature_counts: every party's number of feature columns (public).
    """
    if not clips_features(job):
        return
    bound = job.dp.clip / math.sqrt(feature_parties(job, feature_counts))
    for split in (part.train, part.test):
        if split is not None and split.x.shape[1]:
            split.x = clipping.clip_rows(split.x, bound)


def feature_parties(job: TrainJob, columns: list[int]) -> int:
    """k: how many parties hold part of each row (columns[i] = party i's feature count)."""
    return sum(1 for c in columns if c > 0) if job.partition == "vertical" else 1


def metrics_charge(job: TrainJob) -> tuple[Charge, float] | None:
    """The charge for one epoch's metrics and the noise scale it pays for, if the job releases them.

    Under replace-one, a record replaced by another in the same split (train and test
    rows are counted separately, and the counts are public) moves the revealed [loss sums,
    correct counts] by at most the clipped loss bound L in one loss entry and 1 in one
    count, since each term lies in [0, L] or {0, 1}: a difference of two such terms, not
    twice one as for gradients. L2 sensitivity sqrt(L^2 + 1), L1 sensitivity L + 1.
    """
    assert job.dp is not None
    spec = job.dp.metrics
    if spec is None:
        return None
    bound = spec.loss_bound
    sensitivity = math.sqrt(bound**2 + 1) if spec.mechanism == "gaussian" else bound + 1
    return Charge(spec.mechanism, spec.noise_multiplier), spec.noise_multiplier * sensitivity


def sampling(job: TrainJob, rows: int | None) -> tuple[int, float]:
    """Per epoch: how many steps one record may join, and the probability that it joins each.

    Shuffled public batches: one step, surely. Poisson: round(1/q) steps, each with probability q.

    Raises:
        ValueError: Poisson sampling without the (public) number of training rows.
    """
    assert job.dp is not None
    if job.dp.sampling == "shuffle":
        return 1, 1.0
    if rows is None:
        raise ValueError("poisson sampling needs the number of training rows")
    return poisson_steps(job.training.batch_size, rows), poisson_rate(job.training.batch_size, rows)


def calibration(job: TrainJob, rows: int | None = None) -> tuple[float, float]:
    """DP-SGD's noise multiplier and the L2 sensitivity of a step's summed gradient: replace-one
    for shuffled batches, add/remove for Poisson sampling (``rows`` training rows, public).

    The multiplier is the smallest that keeps the model, plus any per-epoch metrics,
    within the job's (epsilon, delta), for the events :meth:`DpSgd.epoch_charge` charges.

    Raises:
        MpcflError: the metrics alone would spend the whole budget.
    """
    assert job.dp is not None
    if clips_features(job):
        bound = _APPROXIMATION_MARGIN * math.sqrt(job.dp.clip**2 + 1) * gradient_head(job).gradient_bound
    else:
        bound = clipping.sensitivity(job.dp.clip)
    steps, rate = sampling(job, rows)
    sensitivity = replace_one(bound) if rate == 1 else bound
    metrics = metrics_charge(job)
    epochs = job.training.epochs
    extra = [] if metrics is None else [Charge(metrics[0].mechanism, metrics[0].noise_multiplier, epochs)]
    try:
        noise_multiplier = calibrate_noise_multiplier(
            epsilon=job.dp.epsilon, delta=job.dp.delta, count=epochs * steps, accountant=job.dp.accountant,
            extra=extra, sampling_probability=rate,
        )
    except ValueError as err:
        raise MpcflError(f"{job.source}: dp.metrics: {err}; raise dp.metrics.noise_multiplier") from None
    return noise_multiplier, sensitivity


def check_plausible(job: TrainJob | FederatedJob, rows: int | None = None) -> None:
    """Refuses delta >= 1/n, and logs a warning for a delta or an epsilon that protects little.

    n counts what neighbouring datasets differ by: DP-SGD's ``rows`` training rows (None: not
    known here), or, under a federated job's client-level DP, its parties, whatever ``rows``.

    Raises:
        MpcflError: delta >= 1/n.
    """
    assert job.dp is not None
    n, units = (job.world_size, "parties") if isinstance(job, FederatedJob) else (rows, "rows")
    try:
        warnings = check_parameters(epsilon=job.dp.epsilon, delta=job.dp.delta, n=n, units=units)
    except ValueError as err:
        raise MpcflError(f"{job.source}: dp.delta: {err}") from None
    for warning in warnings:
        log.warning("%s: dp: %s", job.source, warning)


class DpSgd(TrainingStep):
    """DP-SGD's calibrated noise on each step's gradients, and the charges for training's reveals."""

    def __init__(self, job: TrainJob, rows: int) -> None:
        assert job.dp is not None
        self.job = job
        self.rows = rows
        self.noise_multiplier, self.sensitivity = calibration(job, rows)
        self.steps, self.rate = sampling(job, rows)
        self.loss_bound = None if job.dp.metrics is None else job.dp.metrics.loss_bound
        self.generator = numpy_generator()
        self.coins = SecureGenerator()  # this party's shares of the inclusion bits; its key never leaves
        self._selections: list[Selection] = []
        log.info(
            "DP-SGD: noise multiplier %.4g for epsilon %g, delta %g over %d epochs of %d steps (%s, rate %.4g); "
            "sensitivity %.4g",
            self.noise_multiplier, job.dp.epsilon, job.dp.delta, job.training.epochs, self.steps,
            job.dp.sampling, self.rate, self.sensitivity,
        )

    def secret_batches(self, n_rows: int, *, device: Any) -> int | None:
        """Poisson: draws the epoch's inclusion bits, secret, in one vectorised protocol (they do not
        depend on the model), and returns its number of steps; each step sees every row."""
        if self.rate == 1:
            return None
        assert n_rows == self.rows
        bits = inclusion_bits((self.steps, n_rows, 1), self.rate, generator=self.coins, device=device)
        self._selections = [Selection(bits[i], self.rate * n_rows) for i in range(self.steps)]
        return self.steps

    def _selection(self) -> Selection | None:
        """This step's secret sample (Poisson), or None for a public batch."""
        return self._selections.pop(0) if self.rate < 1 else None

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

    def epoch_charge(self) -> Charge:
        """Shuffled: a record is in one batch per epoch, one Gaussian mechanism per epoch. Poisson: one
        subsampled Gaussian per step; the events :func:`calibration` calibrated against."""
        return Charge("gaussian", self.noise_multiplier, self.steps, self.rate)

    def model_privacy(self) -> Privacy:
        """The model is post-processing of the noisy steps, charged epoch by epoch."""
        return Privacy(charge=None)

    def notes(self) -> dict[str, Any]:
        return {"dp_sgd": {"noise_multiplier": self.noise_multiplier, "sensitivity": self.sensitivity,
                           "colluders": self.job.colluders, "sampling": self.job.dp.sampling,
                           "sampling_probability": self.rate, "steps_per_epoch": self.steps}}


# CrypTen's sigmoid leaves [0, 1] for logits beyond about 500 (0.882 at 510, -9.7e7 at 515), and
# nothing bounds the weights, so the logits are clamped to +-_LOGIT_CLAMP first: |p - y| <= 1 then
# holds whatever the weights. e^-32 is below fixed point's 2^-16, so no representable p changes.
_LOGIT_CLAMP = 32.0


def gradient_head(job: TrainJob) -> Head:
    """The head training's gradient uses: with the job's ``training.sigmoid``."""
    return head_of(job.model, job.training.sigmoid)


def bounded_gradients(model: Any, x: Any, y: Any, head: Head, selection: Selection | None = None) -> None:
    """Sets the batch-mean gradient of a linear model from (p - y) at logits clamped to
    +-:data:`_LOGIT_CLAMP`, so each example's part is ``(p - y) [x, 1]`` with ``|p - y|`` bounded
    by the head's ``gradient_bound``. A head whose error is bounded for any logit (a cheap
    sigmoid that clamps its own input) needs no second clamp.

    Clamping inside autograd would zero the gradient of every clamped example (the clamp's
    derivative); the output error is computed on the clamped logits and pushed back instead.

    With a secret ``selection`` (Poisson), x and y are every row, and the gradient is the sum over
    the selected rows over the public expected batch size.
    """
    crypten = import_crypten()
    logits = model(x)
    with crypten.no_grad():
        inside = logits if head.bounded_error else clamp_symmetric(logits, _LOGIT_CLAMP)
        error = head.output_error(inside, y)
        if selection is not None:  # 0/1 at scale 1: exact, and an unselected row adds nothing
            error = error * selection.bits
        error = error.div(x.size(0) if selection is None else selection.expected)
    logits.backward(error)


class FeatureClippedDpSgd(DpSgd):
    """Logistic regression: features were clipped before sharing (:func:`bound_features`) and
    logits are clamped (:func:`bounded_gradients`), so the mean gradient is bounded; each party
    adds its noise share to it."""

    def __init__(self, job: TrainJob, head: Head, rows: int) -> None:
        super().__init__(job, rows)
        self.head = head

    def step(self, model: Any, torch_model: nn.Sequential, x: Any, y: Any) -> None:
        selection = self._selection()
        bounded_gradients(model, x, y, self.head, selection)
        sigma = self.noise_multiplier * self.sensitivity / (x.size(0) if selection is None else selection.expected)
        for param in model.parameters():
            self._add_noise(param.grad, sigma)


class PerExampleDpSgd(DpSgd):
    """An MLP: each example's gradient clipped inside MPC, noise on the clipped sum."""

    def __init__(self, job: TrainJob, head: Head, rows: int) -> None:
        super().__init__(job, rows)
        self.head = head

    def step(self, model: Any, torch_model: nn.Sequential, x: Any, y: Any) -> None:
        assert self.job.dp is not None
        selection = self._selection()
        with import_crypten().no_grad():  # gradients by hand: see mpcfl.dp.clipping
            sums = clipping.clipped_gradient_sum(
                model, torch_model, x, y, clip=self.job.dp.clip, output_error=self.head.output_error,
                weights=None if selection is None else selection.bits,
            )
            for name, param in model.named_parameters():
                total = sums[name]
                self._add_noise(total, self.noise_multiplier * self.sensitivity)
                param.grad = total.div(x.size(0) if selection is None else selection.expected)


def training_step(job: TrainJob, rows: int) -> TrainingStep:
    """The job's step strategy, chosen once: plain SGD, or DP-SGD by feature or per-example clipping,
    for ``rows`` training rows (public)."""
    head = gradient_head(job)
    if job.dp is None:
        return PlainSgd(head)
    if clips_features(job):
        return FeatureClippedDpSgd(job, head, rows)
    return PerExampleDpSgd(job, head, rows)
