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
``dp.error_clip`` c clamps each coordinate of ``p - y`` to +-c inside MPC, an exact
comparison, so the bound becomes ``c sqrt(k)`` for k outputs where that is smaller
(:func:`error_bound`): less noise, at the cost of capping the worst-fitted examples.

Neighbouring datasets differ by replacing one record (one row of one party; in a
vertical split, one patient across all parties): row counts are public and the
batches come from a public permutation of the n rows, so removing a record would
reshuffle every batch, and replace-one (same n) is the relation that holds. One
record then moves a step's summed clipped gradient by up to twice its bound
(:func:`mpcfl.dp.accountant.replace_one`), and that is the sensitivity.

Each step, every party adds an integer noise share to its arithmetic share of
the summed gradient (no communication), sized so that the honest parties' noise on
it has standard deviation ``noise_multiplier x sensitivity``; the sum is divided by
the batch size after (post-processing). The sensitivity is the clip's plus fixed
point's rounding (:func:`gradient_rounding`, :mod:`mpcfl.dp.rounding`): noise on the mean
would face the truncation of a division by the batch size against a sensitivity
that division had shrunk.
Batches are disjoint slices of a public permutation, so any one record is in one
step per epoch and nobody's batch membership is secret: the accountant composes
one Gaussian mechanism per epoch, with no amplification by subsampling (which
secret Poisson batches earn: ``dp.sampling: poisson``, below). Each epoch is
charged when it completes, before any release that depends on it.

An MLP's gradients are not bounded by its features, so each example's gradient
is clipped to ``clip`` inside MPC instead (:mod:`mpcfl.dp.clipping`), and the
noise goes on the clipped sum. That clip is a guarantee only while every value it
depends on is bounded: features are clamped to ``data.max_abs`` before sharing,
parameters projected to ``[-dp.weight_bound, dp.weight_bound]`` after every step
(and before the first), and the model refused if its products could still wrap.

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

import numpy as np
from torch import nn

from mpcfl.dp import clipping, rounding
from mpcfl.dp.accountant import Charge, calibrate_noise_multiplier, replace_one
from mpcfl.dp.budget import check_parameters
from mpcfl.dp.sampling import poisson_rate, poisson_steps
from mpcfl.errors import ConfigError, MpcflError
from mpcfl.jobs.schema import FederatedJob, TrainJob
from mpcfl.models.build import build_torch_model
from mpcfl.models.heads import Head, job_head
from mpcfl.models.sigmoid import clamp_symmetric
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.prng import SecureGenerator, numpy_generator
from mpcfl.mpc.reveal import Privacy, add_noise
from mpcfl.mpc.sampling import Selection, inclusion_bits
from mpcfl.tasks.train.steps import PlainSgd, TrainingStep

log = logging.getLogger(__name__)

_APPROXIMATION_MARGIN = 1.01


def clips_features(job: TrainJob) -> bool:
    """DP logistic regression bounds its gradients by clipping features before sharing;
    an MLP clips each example's gradient inside MPC (:mod:`mpcfl.dp.clipping`)."""
    return job.dp is not None and job.model.type in ("logistic_regression", "linear_regression")


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


def center_charge(job: TrainJob) -> Charge | None:
    """``dp.center``'s release, one Gaussian on the summed rows; None for a job that does not centre."""
    if job.dp is None or job.dp.center is None:
        return None
    return Charge("gaussian", job.dp.center.noise_multiplier)


def center_noise(job: TrainJob, n_features: int) -> float:
    """The standard deviation of ``dp.center``'s noise on the summed rows: its multiplier times their L2
    sensitivity (one row's clipped norm, ``dp.center.bound``, under add/remove; twice it under
    ``sampling: shuffle``'s replace-one) with each coordinate's encoding
    (:func:`mpcfl.dp.rounding.encoded_sum`; each party encodes its own sums once)."""
    assert job.dp is not None and job.dp.center is not None
    z, bound = job.dp.center.noise_multiplier, job.dp.center.bound
    l2 = replace_one(bound) if job.dp.sampling == "shuffle" else bound
    return z * rounding.effective_sensitivity(l2, rounding.encoded_sum(n_features), dimension=n_features, noise_multiplier=z)


def own_columns(job: TrainJob, feature_counts: list[int], rank: int) -> slice:
    """Where this party's columns sit among the model's inputs: its own block in a vertical split, all of them in a horizontal one."""
    if job.partition != "vertical":
        return slice(0, feature_counts[rank])
    start = sum(feature_counts[:rank])
    return slice(start, start + feature_counts[rank])


def center_sums(job: TrainJob, part: Any, feature_counts: list[int], rank: int) -> np.ndarray:
    """This party's term of ``dp.center``'s sum: its training rows, each clipped to ``dp.center.bound``
    (its slice of a vertical row to bound / sqrt(k)), summed, over every model input (zeros outside
    its own columns). The parties' terms add up to the sum of the whole rows, clipped."""
    assert job.dp is not None and job.dp.center is not None
    width = sum(feature_counts) if job.partition == "vertical" else feature_counts[rank]
    sums = np.zeros(width)
    if part.train.x.shape[1]:
        bound = job.dp.center.bound / math.sqrt(feature_parties(job, feature_counts))
        # data.max_abs first: a value that scaling took to +-inf (or NaN) would make its row's clip NaN,
        # which fixed point encodes as -2^63 and the noise cannot hide
        rows = np.nan_to_num(np.clip(part.train.x, -job.data.max_abs, job.data.max_abs), nan=0.0)
        sums[own_columns(job, feature_counts, rank)] = clipping.clip_rows(rows, bound).sum(axis=0)
    return sums


def apply_center(part: Any, own: np.ndarray) -> None:
    """Subtracts ``own``, the (noisy) mean of this party's columns, from its train and test rows, in place,
    and folds it into the party's scaler (what the exported model applies): ``(x - c) / s - m`` is
    ``(x - (c + s m)) / s``."""
    own = np.asarray(own, dtype=np.float64)
    if not own.size:
        return
    for split in (part.train, part.test):
        if split is not None:
            split.x = split.x - own
    if not part.scaler:
        part.scaler = {"columns": part.train.columns, "mean": [0.0] * own.size, "std": [1.0] * own.size}
    part.scaler["mean"] = [c + s * m for c, s, m in zip(part.scaler["mean"], part.scaler["std"], own.tolist())]
    part.center = own.tolist()


def metrics_charge(job: TrainJob) -> tuple[Charge, float] | None:
    """The charge for one epoch's metrics and the noise scale it pays for, if the job releases them.

    Under replace-one, a record replaced by another in the same split (train and test
    rows are counted separately, and the counts are public) moves the revealed [loss sums,
    correct counts] by at most the clipped loss bound L in one loss entry and 1 in one
    count, since each term lies in [0, L] or {0, 1}: a difference of two such terms, not
    twice one as for gradients. L2 sensitivity sqrt(L^2 + 1), L1 sensitivity L + 1. A
    regression's absolute errors are clipped to [0, L] too: sqrt(2) L and 2 L.
    """
    assert job.dp is not None
    spec = job.dp.metrics
    if spec is None:
        return None
    bound = spec.loss_bound
    summary = 1.0 if job.regression is None else bound
    sensitivity = math.hypot(bound, summary) if spec.mechanism == "gaussian" else bound + summary
    return Charge(spec.mechanism, spec.noise_multiplier), spec.noise_multiplier * sensitivity


def gradient_rounding(job: TrainJob, n_features: int) -> tuple[rounding.Rounding, int]:
    """How far fixed point can move a step's summed gradient between neighbouring datasets beyond
    the clip's bound, in ring units, and the number of parameters (the coordinates).

    Only the replaced record's terms differ (for the same shares), each side of the replacement
    counted once; n parties truncate a product by 2^16 within n units (:func:`rounding.truncation_error`).

    - logistic regression: a weight's sum is ``sum_i e_i x_ij`` as one matmul, truncated once (n);
      the record's encoded feature is off by less than a unit, times its error ``|e_i| <= 1.01 x``
      the head's bound; a bias's sum adds the errors exactly;
    - an MLP (:func:`mpcfl.dp.clipping.clipped_gradient_sum`): a weight's sum is one matmul of the
      clipped errors and the layer's inputs, truncated once (n); the clipped errors' own rounding is
      inside the norm the clip checks, and a bias's sum adds them exactly.
    """
    assert job.dp is not None
    model = build_torch_model(job.model, n_features=n_features, seed=None)
    parties = job.world_size
    truncation = rounding.truncation_error(parties, rounding.FIXED_POINT_SCALE)
    per_weight = truncation
    if clips_features(job):
        per_weight += rounding.ENCODING * _APPROXIMATION_MARGIN * error_bound(gradient_head(job), job.dp.error_clip)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    parameters = sum(p.numel() for p in model.parameters())
    return rounding.Rounding.per_coordinate(weights, 2 * per_weight), parameters


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


def calibration(job: TrainJob, n_features: int, rows: int | None = None) -> tuple[float, float]:
    """DP-SGD's noise multiplier and the sensitivity of a step's summed gradient that its noise is
    calibrated to: the clip's L2 bound (replace-one for shuffled batches, add/remove for Poisson
    sampling of ``rows`` training rows, public), plus fixed point's rounding for a model on
    ``n_features`` inputs (:func:`gradient_rounding`).

    The multiplier is the smallest that keeps the model, plus any per-epoch metrics,
    within the job's (epsilon, delta), for the events :meth:`DpSgd.epoch_charge` charges.

    Raises:
        MpcflError: the metrics alone would spend the whole budget.
        ConfigError: rounding would move epsilon by more than 1%; names the file, ``dp.clip`` and the fix.
    """
    assert job.dp is not None
    if clips_features(job):
        bound = _APPROXIMATION_MARGIN * math.sqrt(job.dp.clip**2 + 1) * error_bound(gradient_head(job), job.dp.error_clip)
    else:
        bound = clipping.sensitivity(job.dp.clip)
    steps, rate = sampling(job, rows)
    l2 = replace_one(bound) if rate == 1 else bound
    metrics = metrics_charge(job)
    epochs = job.training.epochs
    releases = epochs if job.dp.metrics is not None and job.dp.metrics.when == "every_epoch" else 1
    extra = [] if metrics is None else [Charge(metrics[0].mechanism, metrics[0].noise_multiplier, releases)]
    if (center := center_charge(job)) is not None:
        extra.append(center)
    try:
        noise_multiplier = calibrate_noise_multiplier(
            epsilon=job.dp.epsilon, delta=job.dp.delta, count=epochs * steps, accountant=job.dp.accountant,
            extra=extra, sampling_probability=rate,
        )
    except ValueError as err:
        which = [key for key, present in (("dp.metrics", metrics), ("dp.center", center)) if present is not None]
        raise MpcflError(f"{job.source}: {', '.join(which)}: {err}; raise {' or '.join(k + '.noise_multiplier' for k in which)}") from None
    rounded, parameters = gradient_rounding(job, n_features)
    try:
        sensitivity = rounding.check_rounding(
            epsilon=job.dp.epsilon, delta=job.dp.delta, accountant=job.dp.accountant, noise_multiplier=noise_multiplier,
            count=epochs * steps, l2=l2, rounding=rounded, dimension=parameters, extra=extra,
            sampling_probability=rate,
        )
    except ValueError as err:
        if job.dp.error_clip is not None:  # the clamp shrank the sensitivity the rounding is set against
            raise ConfigError(
                f"{job.source}: dp.error_clip: {err} (dp.clip={job.dp.clip:g}, dp.error_clip={job.dp.error_clip:g}: "
                "raise error_clip)"
            ) from None
        raise ConfigError(f"{job.source}: dp.clip: {err} (dp.clip={job.dp.clip:g})") from None
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

    def __init__(self, job: TrainJob, n_features: int, rows: int) -> None:
        assert job.dp is not None
        self.job = job
        self.rows = rows
        self.noise_multiplier, self.sensitivity = calibration(job, n_features, rows)
        self.steps, self.rate = sampling(job, rows)
        self.loss_bound = None if job.dp.metrics is None else job.dp.metrics.loss_bound
        self.generator = numpy_generator()
        self.coins = SecureGenerator()  # this party's shares of the inclusion bits; its key never leaves
        self._selections: list[Selection] = []
        log.info(
            "DP-SGD: noise multiplier %.4g for epsilon %g, delta %g over %d epochs, %d accounted release(s) an epoch (%s, "
            "rate %.4g); sensitivity %.4g",
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
        add_noise(value, "gaussian", sigma, colluders=self.job.colluders, source=self.job.noise_source, generator=self.generator)

    def metrics_privacy(self) -> Privacy | None:
        """Noise and charge for one metrics release, or None when the job does not release them."""
        metrics = metrics_charge(self.job)
        if metrics is None:
            return None
        source = self.job.noise_source if metrics[0].mechanism == "gaussian" else "parties"
        return Privacy(charge=metrics[0], scale=metrics[1], colluders=self.job.colluders, source=source)

    def releases_metrics(self, epoch: int, epochs: int) -> bool:
        """Only what ``dp.metrics`` pays for: every epoch, or the final model's once."""
        spec = self.job.dp.metrics if self.job.dp is not None else None
        return spec is not None and (spec.when == "every_epoch" or epoch == epochs - 1)

    def metrics_release(self) -> dict[str, Any]:
        spec = self.job.dp.metrics if self.job.dp is not None else None
        if spec is None:
            return {"released": "none", "why": "dp without dp.metrics: metrics would spend budget"}
        metrics = metrics_charge(self.job)
        assert metrics is not None
        return {
            "released": "noisy", "when": spec.when, "mechanism": spec.mechanism, "noise_scale": metrics[1],
            "loss_bound": spec.loss_bound,
            "note": "loss and correct-count sums carry DP noise of this scale, charged to the budget; "
                    "means are clamped to their ranges (post-processing)",
        }

    def epoch_charge(self) -> Charge:
        """Shuffled: a record is in one batch per epoch, one Gaussian mechanism per epoch. Poisson: one
        subsampled Gaussian per step; the events :func:`calibration` calibrated against."""
        return Charge("gaussian", self.noise_multiplier, self.steps, self.rate)

    def model_privacy(self) -> Privacy:
        """The model is post-processing of the noisy steps, charged epoch by epoch."""
        return Privacy(charge=None)

    def notes(self) -> dict[str, Any]:
        return {"dp_sgd": {"noise_multiplier": self.noise_multiplier, "sensitivity": self.sensitivity,
                           "clip": self.job.dp.clip, "error_clip": self.job.dp.error_clip,
                           "noise": self.job.noise_source, "colluders": self.job.colluders, "sampling": self.job.dp.sampling,
                           "sampling_probability": self.rate, "steps_per_epoch": self.steps}}


def gradient_head(job: TrainJob) -> Head:
    """The head training's gradient uses: with the job's ``training.sigmoid``."""
    return job_head(job, gradient=True)


def error_bound(head: Head, error_clip: float | None) -> float:
    """L2 bound on one example's output error ``p - y`` as a DP linear model's gradient uses it: the
    head's, or, under ``dp.error_clip`` c, each of its ``k`` coordinates clamped to +-c, so at most
    ``c sqrt(k)`` (whatever the sigmoid or softmax approximation returns)."""
    if error_clip is None:
        return head.gradient_bound
    return min(head.gradient_bound, error_clip * math.sqrt(head.output_size))


def bounded_gradients(
    model: Any, x: Any, y: Any, head: Head, selection: Selection | None = None, *, mean: bool = True,
    error_clip: float | None = None,
) -> None:
    """Sets the batch-mean gradient (``mean``; else the sum) of a linear model from (p - y) at logits clamped to
    +-:data:`~mpcfl.dp.clipping.LOGIT_CLAMP` (CrypTen's sigmoid leaves [0, 1] beyond about 500,
    and nothing bounds a linear model's weights), so each example's part is ``(p - y) [x, 1]`` with ``|p - y|`` bounded
    by the head's ``gradient_bound``. A head whose error is bounded for any logit (a cheap
    sigmoid that clamps its own input) needs no second clamp.

    Clamping inside autograd would zero the gradient of every clamped example (the clamp's
    derivative); the output error is computed on the clamped logits and pushed back instead.

    With a secret ``selection`` (Poisson), x and y are every row, and the gradient is the sum over
    the selected rows over the public expected batch size. With ``error_clip`` each coordinate of
    each example's error is clamped to +-error_clip (:func:`error_bound`).
    """
    crypten = import_crypten()
    logits = model(x)
    with crypten.no_grad():
        inside = logits if head.bounded_error else clamp_symmetric(logits, clipping.LOGIT_CLAMP)
        error = head.output_error(inside, y)
        if error_clip is not None:
            error = clamp_symmetric(error, error_clip)
        if selection is not None:  # 0/1 at scale 1: exact, and an unselected row adds nothing
            error = error * selection.bits
        if mean:
            error = error.div(x.size(0) if selection is None else selection.expected)
    logits.backward(error)


class FeatureClippedDpSgd(DpSgd):
    """Logistic regression: features were clipped before sharing (:func:`bound_features`) and
    logits are clamped (:func:`bounded_gradients`), so the summed gradient is bounded; each party
    adds its noise share to it, and the noisy sum is divided by the batch size."""

    def __init__(self, job: TrainJob, head: Head, n_features: int, rows: int) -> None:
        super().__init__(job, n_features, rows)
        self.head = head

    def step(self, model: Any, torch_model: nn.Sequential, x: Any, y: Any) -> None:
        selection = self._selection()
        bounded_gradients(model, x, y, self.head, selection, mean=False, error_clip=self.job.dp.error_clip)
        divisor = x.size(0) if selection is None else selection.expected
        for param in model.parameters():
            self._add_noise(param.grad, self.noise_multiplier * self.sensitivity)
            param.grad = param.grad.div(divisor)


class PerExampleDpSgd(DpSgd):
    """An MLP: each example's gradient clipped inside MPC, noise on the clipped sum, and the
    parameters kept within ``dp.weight_bound`` (the clip's guarantee depends on it)."""

    def __init__(self, job: TrainJob, head: Head, n_features: int, rows: int) -> None:
        super().__init__(job, n_features, rows)
        self.head = head
        self.largest: float | None = None  # the public bound on an example's squared gradient norm

    def step(self, model: Any, torch_model: nn.Sequential, x: Any, y: Any) -> None:
        assert self.job.dp is not None
        if self.largest is None:
            self.largest = clipping.largest_squared_norm(clipping.layer_bounds(
                torch_model, input_bound=self.job.data.max_abs, weight_bound=self.job.dp.weight_bound,
                error_bound=self.head.gradient_bound,
            ))
        selection = self._selection()
        crypten = import_crypten()
        with crypten.no_grad():  # gradients by hand: see mpcfl.dp.clipping
            sums = clipping.clipped_gradient_sum(
                model, torch_model, x, y, clip=self.job.dp.clip, output_error=self.head.output_error,
                clamp=clamp_symmetric, stack=crypten.stack, largest=self.largest,
                truncation=self.job.world_size * 2.0**-16,  # a unit per party (mpcfl.dp.rounding)
                weights=None if selection is None else selection.bits,
            )
            for name, param in model.named_parameters():
                total = sums[name]
                self._add_noise(total, self.noise_multiplier * self.sensitivity)
                param.grad = total.div(x.size(0) if selection is None else selection.expected)

    def project(self, model: Any) -> None:
        """Clamps every parameter to +-``dp.weight_bound``, under MPC: post-processing of the noisy
        model, so free, and what keeps every later product within fixed point's range."""
        assert self.job.dp is not None
        crypten = import_crypten()
        params = [param for _, param in model.named_parameters()]
        with crypten.no_grad():
            flat = clamp_symmetric(crypten.cat([p.flatten() for p in params]), self.job.dp.weight_bound)
        offset = 0
        for param in params:
            size = param.nelement()
            param.share = flat[offset : offset + size].reshape(param.size()).share
            offset += size



def training_step(job: TrainJob, n_features: int, rows: int) -> TrainingStep:
    """The job's step strategy, chosen once: plain SGD, or DP-SGD by feature or per-example clipping,
    calibrated for a model on ``n_features`` inputs and ``rows`` training rows (public)."""
    head = gradient_head(job)
    if job.dp is None:
        return PlainSgd(head)
    if clips_features(job):
        return FeatureClippedDpSgd(job, head, n_features, rows)
    return PerExampleDpSgd(job, head, n_features, rows)
