"""The same job trained in plaintext PyTorch, as the accuracy reference for secure training.

This reads every party's files in one process, so it is a measurement tool for
public or test data, never part of a secure run. It mirrors the secure path:
the same standardisation, initial weights, batch order, optimiser and loss.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mpcfl.data.party import (
    PartyData, apply_scaler, check_range, check_scaling_covers, fill_missing, filled_jointly, load_party_data, present_sums,
    standardize_locally,
)
from mpcfl.data.psi import align_plainly
from mpcfl.jobs.schema import TrainJob
from mpcfl.models.build import build_torch_model
from mpcfl.models.heads import Head, job_head
from mpcfl.errors import MpcflError
from mpcfl.tasks.train.dataset import prepare
from mpcfl.tasks.train.export import PREPROCESSING
from mpcfl.tasks.train.dp_sgd import apply_center, calibration, center_noise, center_sums, clips_features, own_columns, sampling
from mpcfl.tasks.train.loop import batches


@dataclass
class PlainResult:
    model: torch.nn.Module
    history: list[dict[str, float]]


def _joined(job: TrainJob, parts: list[PartyData], which: str) -> tuple[np.ndarray, np.ndarray] | None:
    splits = [getattr(p, which) for p in parts]
    if any(s is None for s in splits):
        return None
    if job.partition == "vertical":
        owner = job.rank_of(job.labels.party)
        return np.hstack([s.x for s in splits]), splits[owner].y
    return np.vstack([s.x for s in splits]), np.concatenate([s.y for s in splits])


def _evaluate(head: Head, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, float]:
    """The split's loss and scores (accuracy, or a regression's MAE, RMSE and R^2) as metrics.json names them."""
    with torch.no_grad():
        logits = model(x)
        scores = head.plain_scores(logits, y)
        record = {"loss" if prefix == "train_" else "test_loss": float(head.plain_loss(logits, y))}
    return record | {prefix + name: value for name, value in scores.items()}


def prepared_data(
    job: TrainJob, *, seed: int | None = None, center: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """All parties' train and test data, joined and preprocessed as the secure run does.

    With ``dp.center``: centred on ``center`` (a run's opened mean, every input's), or else on the
    clipped rows' mean plus the noise the secure run adds, drawn from ``seed`` (default
    ``training.seed``; a simulation, not a secure draw).

    Raises:
        DataError: a party's files are unusable.
    """
    parts = [load_party_data(job, name) for name in job.party_names]
    if joint := filled_jointly(job):  # the means over every party's present cells, as the secure run computes
        sums, counts = (np.sum(values, axis=0) for values in zip(*(present_sums(p, joint) for p in parts)))
        for part in parts:
            fill_missing(part, {column: float(t / n) for column, t, n in zip(joint, sums, counts)})
    if job.keyed:
        align_plainly(job, parts)
    feature_counts = [p.train.x.shape[1] for p in parts]
    if job.partition == "vertical":
        standardize = standardize_locally
    else:  # the joint statistics the secure run computes under MPC, here over all rows at once
        rows = np.vstack([p.train.x for p in parts])
        mean, std = rows.mean(axis=0), rows.std(axis=0)

        def standardize(part: PartyData) -> None:
            apply_scaler(part, mean, std)

    if job.dp is not None and job.dp.center is not None and center is None:
        center = _simulated_center(job, parts, feature_counts, standardize, job.training.seed if seed is None else seed)
    for rank, part in enumerate(parts):
        prepare(
            job, part, feature_counts=feature_counts, standardize=standardize,
            check=lambda p: check_range(p, job.data.max_abs),
            center=lambda p, rank=rank: apply_center(p, np.asarray(center)[own_columns(job, feature_counts, rank)]),
        )
    if job.data.scaling is not None:  # after each party named any column of its own left out
        n_columns = sum(feature_counts) if job.partition == "vertical" else feature_counts[0]
        check_scaling_covers(job.data.scaling, n_columns, job.source)
    head = job_head(job)
    x_np, y_np = _joined(job, parts, "train")
    x, y = torch.tensor(x_np, dtype=torch.float32), head.plain_targets(y_np)
    test = _joined(job, parts, "test")
    if test is None:
        return x, y, None, None
    return x, y, torch.tensor(test[0], dtype=torch.float32), head.plain_targets(test[1])


def run_center(job: TrainJob, run: str) -> np.ndarray | None:
    """The ``dp.center`` mean a run of ``job`` trained on, every input's: each party's columns' from its
    ``preprocessing.json`` in its folder of ``run`` (a run id, or ``latest``), in rank order (a horizontal
    party's is whole). None for a job that does not centre.

    Raises:
        MpcflError: a party's folder of the run has no readable mean.
    """
    if job.dp is None or job.dp.center is None:
        return None
    slices = []
    for name in job.party_names if job.partition == "vertical" else job.party_names[:1]:
        path = job.party_root(name) / run / PREPROCESSING
        try:
            slices.append(json.loads(path.read_text())["center"] or [])
        except (OSError, ValueError, KeyError) as err:
            raise MpcflError(f"{path}: no dp.center mean to score run {run} with ({err})") from None
    return np.concatenate(slices)


class _Summed(Exception):
    """Stops :func:`prepare` at the centring step, once a party's term of the sum is taken."""


def _simulated_center(job: TrainJob, parts: list[PartyData], feature_counts: list[int], standardize: Callable[[PartyData], None],
                      seed: int) -> np.ndarray:
    """``dp.center``'s opened mean in plaintext: every party's term (:func:`center_sums`, on copies
    preprocessed up to the centring step) plus the secure run's total noise, over the row count."""
    sums = []
    for rank, part in enumerate(parts):
        def take(p: PartyData, rank: int = rank) -> None:
            sums.append(center_sums(job, p, feature_counts, rank))
            raise _Summed

        with contextlib.suppress(_Summed):
            prepare(job, copy.deepcopy(part), feature_counts=feature_counts, standardize=standardize,
                    check=lambda p: None, center=take)
    total = np.sum(sums, axis=0)
    noise = center_noise(job, total.size) * job.noise_inflation
    rows = sum(p.train.x.shape[0] for p in parts) if job.partition == "horizontal" else parts[0].train.x.shape[0]
    return (total + np.random.default_rng(seed).normal(0.0, noise, total.size)) / rows


def evaluate_state_dict(job: TrainJob, state_dict: dict[str, torch.Tensor], *, center: np.ndarray | None = None) -> dict[str, float]:
    """Loss and scores of revealed weights on the job's (joined) train and test data (``center``: the
    run's ``dp.center`` mean, which its weights were trained on)."""
    x, y, x_test, y_test = prepared_data(job, center=center)
    model = build_torch_model(job.model, n_features=x.shape[1])
    model.load_state_dict(state_dict)
    head = job_head(job)
    record = _evaluate(head, model, x, y, "train_")
    if x_test is not None:
        record.update(_evaluate(head, model, x_test, y_test, "test_"))
    return record


def _clamped_error_backward(
    model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, error_clip: float,
) -> None:
    """Sets the gradient of the batch-mean loss with each example's d(loss)/d(logits) clamped to +-``error_clip``."""
    logits = model(x)
    free = logits.detach().requires_grad_()
    (error,) = torch.autograd.grad(loss_fn(free, y, reduction="sum"), free)
    logits.backward(error.clamp(-error_clip, error_clip) / len(x))


def _clipped_sum_gradients(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, clip: float) -> None:
    """Sets each parameter's gradient to the batch mean of per-example gradients clipped to ``clip``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(weights: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, weights, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    # vmap gives every example's gradient in one pass: shadow models in the audit train thousands of DP steps
    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.reshape(len(x), -1).pow(2).sum(1) for g in grads.values()))
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    for name, param in model.named_parameters():
        grad = grads[name]
        param.grad = (grad * scale.view(-1, *[1] * (grad.dim() - 1))).sum(0) / len(x)


def train_plaintext(
    job: TrainJob,
    *,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
    seed: int | None = None,
) -> PlainResult:
    """Trains the job's model in plaintext on all parties' data joined.

    With ``job.dp`` it simulates DP-SGD: the same clipping, and Gaussian noise of the
    same multiplier and sensitivity on each step's gradient; under ``dp.sampling: poisson``
    the same Poisson batches (drawn here in plaintext) and the same division by q n.

    Args:
        job: the training job.
        data: already prepared ``(x, y, x_test, y_test)``; default :func:`prepared_data`.
        seed: overrides ``training.seed`` (initial weights, batch order, noise).

    Raises:
        DataError: a party's files are unusable.
    """
    spec = job.training
    seed = spec.seed if seed is None else seed
    x, y, x_test, y_test = data if data is not None else prepared_data(job, seed=seed)
    model = build_torch_model(job.model, n_features=x.shape[1], seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    head = job_head(job)
    loss_fn = head.plain_loss
    noise_std = 0.0
    if job.dp is not None:  # what the secure run reveals: the dealer's sigma, or n parties' shares of sigma^2 / (n - t)
        noise_std = math.prod(calibration(job, x.shape[1], len(x))) * job.noise_inflation
    steps, rate = sampling(job, len(x)) if job.dp is not None else (1, 1.0)
    generator = torch.Generator().manual_seed(seed)
    per_example = job.dp is not None and not clips_features(job)
    error_clip = job.dp.error_clip if job.dp is not None else None

    def project() -> None:  # the secure run's projection (PerExampleDpSgd.project), from the first step
        if per_example:
            with torch.no_grad():
                for param in model.parameters():
                    param.clamp_(-job.dp.weight_bound, job.dp.weight_bound)

    project()
    history = []
    for epoch in range(spec.epochs):
        if rate == 1:
            plan = batches(len(x), batch_size=spec.batch_size, seed=seed, epoch=epoch, shuffle=spec.shuffle)
        else:  # a simulation of the secret bits: a measurement tool, not a secure run
            plan = [np.flatnonzero(torch.rand(len(x), generator=generator).numpy() < rate) for _ in range(steps)]
        for rows in plan:
            index = torch.from_numpy(rows)
            # the secure run divides by the public expected batch size under Poisson sampling
            denominator = len(rows) if rate == 1 else rate * len(x)
            optimizer.zero_grad()
            if not len(rows):
                pass  # an empty sample: no gradient, only noise
            elif per_example:
                _clipped_sum_gradients(model, loss_fn, x[index], y[index], clip=job.dp.clip)
            elif error_clip is not None:  # the secure step's clamp of each example's error (dp.error_clip)
                _clamped_error_backward(model, loss_fn, x[index], y[index], error_clip)
            else:
                loss_fn(model(x[index]), y[index]).backward()
            for param in model.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad *= len(rows) / denominator  # the losses are means over the rows
                if noise_std:
                    param.grad += torch.randn(param.shape, generator=generator) * noise_std / denominator
            optimizer.step()
            project()
        record = {"epoch": epoch + 1, **_evaluate(head, model, x, y, "train_")}
        if x_test is not None:
            record.update(_evaluate(head, model, x_test, y_test, "test_"))
        history.append(record)
    return PlainResult(model=model, history=history)
