"""Secure training: mini-batch SGD under MPC on secret-shared data.

The batch order is a public permutation from the job's seed, so every party
indexes the same rows. Per-epoch metrics are computed under MPC over whole
splits and leave MPC only as aggregates, through :func:`mpcfl.mpc.reveal.reveal`,
to the job's metric receivers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mpcfl.tasks.train import checkpoint
from mpcfl.mpc.compat import import_crypten
from mpcfl.tasks.train.bounds import Bounds, check_revealed, safe_input_norm, training_bounds
from mpcfl.jobs.schema import TrainJob
from mpcfl.tasks.train.dataset import SharedData
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.dp.budget import Budget
from mpcfl.dp.clipping import clipped_gradient_sum
from mpcfl.tasks.train.dp_sgd import DpSgd, clips_features
from mpcfl.mpc.reveal import Privacy, reveal
from mpcfl.mpc.session import agreed, communication_stats

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one party ends training with."""

    model: Any  # the encrypted crypten model; its parameters are this party's shares
    torch_model: torch.nn.Sequential  # the architecture, for receivers to load weights into
    history: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None  # revealed weights, receivers only


def batches(n_rows: int, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Row indices of each batch in one epoch; the same at every party (and in plaintext)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def _step_criterion(job: TrainJob, crypten: Any) -> Any:
    """The training loss, for its gradient only: the forward value is never used,
    so skip computing it (it costs a log per example)."""
    if job.training.loss == "bce":
        return crypten.nn.BCEWithLogitsLoss(skip_forward=True)
    return crypten.nn.CrossEntropyLoss(skip_forward=True)


# exp(-a) in CrypTen is (1 - a/2^8)^(2^8), which blows up for a > 256; terms this
# far out contribute < e^-40 to a loss anyway.
_EXP_FLOOR = 40.0


def _min_with(a: Any, cap: float) -> Any:
    """min(a, cap) under MPC: one comparison."""
    return a - (a - cap).relu()


def _example_losses(job: TrainJob, logits: Any, y: Any) -> Any:
    """Each example's loss for reporting, accurate to about 1e-3.

    CrypTen's own losses take log(p) of a probability with its ``input_in_01``
    approximation, which is off by ~0.04 at p=1, so a well-fitted model reports
    twice its true loss. Here log only sees arguments in [1, classes], where
    CrypTen's general log is accurate: BCE = relu(z) - y*z + log(1 + exp(-|z|)),
    cross-entropy = logsumexp(z) - z[y] with logsumexp shifted by the row max.
    """
    if job.model.num_classes == 2:
        magnitude = logits.abs()
        relu = (logits + magnitude).div(2)
        tail = (_min_with(magnitude, _EXP_FLOOR).neg().exp() + 1).log()
        return (relu - y * logits + tail).squeeze(1)
    top = logits.max(dim=1, keepdim=True)[0]
    shifted = _min_with(top - logits, _EXP_FLOOR).neg()
    logsumexp = top.squeeze(1) + shifted.exp().sum(dim=1).log()
    return logsumexp - (logits * y).sum(dim=1)


def _loss_and_correct(job: TrainJob, model: Any, x: Any, y: Any, *, loss_bound: float | None) -> list[Any]:
    """Summed loss and number of correct predictions over a whole split, still encrypted.

    With ``loss_bound`` each example's loss is clipped to [0, loss_bound] first, so one
    record moves the sum by at most that much (the sensitivity DP metrics rely on).
    """
    logits = model(x)
    losses = _example_losses(job, logits, y)
    if loss_bound is not None:
        losses = losses.relu() - (losses - loss_bound).relu()
    if job.model.num_classes == 2:
        # Predictions and labels are 0/1, so each squared difference counts one error.
        errors = (logits.gt(0.0) - y).square().sum()
        correct = errors.neg() + y.size(0)
    else:
        correct = (logits.argmax(dim=1, one_hot=True) * y).sum()
    return [losses.sum().reshape(1), correct.reshape(1)]


def _metrics(opened: torch.Tensor, n_train: int, n_test: int | None) -> dict[str, float]:
    """Means from the revealed sums. DP noise can push them out of range; clamping them
    back is post-processing, so it costs no privacy."""
    sums = opened.double().tolist()
    record = {"loss": max(sums[0] / n_train, 0.0), "train_accuracy": min(max(sums[1] / n_train, 0.0), 1.0)}
    if n_test is not None:
        record.update(test_loss=max(sums[2] / n_test, 0.0), test_accuracy=min(max(sums[3] / n_test, 0.0), 1.0))
    return record


# DP noise on revealed metrics moves them legitimately; this many noise scales is beyond
# any draw a run will see (Gaussian or Laplace tails e^-40 and below).
_NOISE_SLACK = 40.0


def _check_metrics(
    opened: torch.Tensor | None, limits: Bounds, rows: list[int], *, classes: int, noise: float, what: str
) -> None:
    """Receivers only: refuse revealed [loss sum, correct count] pairs that show wrap-around.

    A loss sum is at least 0 and at most ``limits.loss_sum``; a count lies in [0, rows].
    The slack covers CrypTen's approximations (1e-2 per example) and any DP noise.
    """
    if opened is None:
        return
    low, high = [], []
    for n in rows:
        slack = 0.01 * n + _NOISE_SLACK * noise
        low += [-slack, -slack]
        high += [limits.loss_sum(n, classes) + slack, n + slack]
    check_revealed(opened, what=what, low=low, high=high)


def _check_weights(state: dict[str, torch.Tensor] | None, limits: Bounds, *, what: str) -> None:
    """Model receivers only: refuse revealed parameters beyond the weight bound."""
    if state is not None:
        check_revealed(torch.cat([t.flatten() for t in state.values()]), what=what, low=-limits.weight, high=limits.weight)


def train(
    job: TrainJob,
    shared: SharedData,
    *,
    rank: int,
    party: str,
    resume: checkpoint.Checkpoint | None = None,
    budget: Budget | None = None,
) -> TrainResult:
    """Trains the job's model on secret-shared data; every party calls it together.

    After each epoch the party checkpoints its shares (see :mod:`mpcfl.tasks.train.checkpoint`);
    with ``resume`` it continues after the checkpoint's epoch.

    Returns:
        The encrypted model, the per-epoch history (metrics only on metric
        receivers; communication figures on every party), and the revealed
        ``state_dict`` on model receivers.
    """
    crypten = import_crypten()
    spec = job.training
    torch_model = build_torch_model(job.model, n_features=shared.n_features, seed=spec.seed)
    model = to_crypten(torch_model).encrypt(src=0)
    if job.runtime.device == "cuda":
        model = model.cuda()
    model.train()
    optimizer = crypten.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    step_loss = _step_criterion(job, crypten)
    metric_ranks = job.ranks(job.outputs.metrics_to)
    n_rows = shared.x_train.size(0)
    split_rows = [n_rows] + ([] if shared.x_test is None else [shared.x_test.size(0)])
    # What the range check before sharing guarantees; revealed values beyond it wrapped.
    safe_norm = safe_input_norm(job, n_features=shared.n_features, n_rows=n_rows, metric_rows=max(split_rows))
    limits = training_bounds(job, n_features=shared.n_features, n_rows=n_rows, input_norm=safe_norm)
    result = TrainResult(model=model, torch_model=torch_model)
    dp_sgd = DpSgd(job) if job.dp is not None else None
    if dp_sgd is not None and budget is not None:
        budget.notes["dp_sgd"] = dp_sgd.summary()
    first = 0
    if resume is not None:
        checkpoint.restore(model, optimizer, resume)
        result.history, first = list(resume.history), resume.epoch

    for epoch in range(first, spec.epochs):
        started, comm_before = time.perf_counter(), communication_stats()
        plan = batches(n_rows, batch_size=spec.batch_size, seed=spec.seed, epoch=epoch, shuffle=spec.shuffle)
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{spec.epochs}", unit="batch", disable=rank != 0, mininterval=1.0)
        for rows in bar:
            index = torch.from_numpy(rows)
            optimizer.zero_grad()
            if dp_sgd is not None and not clips_features(job):
                with crypten.no_grad():  # gradients by hand: see mpcfl.dp.clipping
                    sums = clipped_gradient_sum(
                        model, torch_model, shared.x_train[index], shared.y_train[index],
                        clip=job.dp.clip, binary=job.model.num_classes == 2,
                    )
                    dp_sgd.set_noisy_mean(dict(model.named_parameters()), sums, len(rows))
            else:
                step_loss(model(shared.x_train[index]), shared.y_train[index]).backward()
                if dp_sgd is not None:
                    dp_sgd.noise_gradients(list(model.parameters()), len(rows))
            optimizer.step()
        record: dict[str, float] = {"epoch": epoch + 1}
        if metric_ranks:
            privacy = dp_sgd.metrics_privacy() if dp_sgd is not None else None
            bound = job.dp.metrics.loss_bound if privacy is not None else None
            with crypten.no_grad():
                parts = _loss_and_correct(job, model, shared.x_train, shared.y_train, loss_bound=bound)
                if shared.x_test is not None:
                    parts += _loss_and_correct(job, model, shared.x_test, shared.y_test, loss_bound=bound)
            opened = reveal(
                crypten.cat(parts), to=metric_ranks, what=f"epoch {epoch + 1} loss and accuracy", privacy=privacy
            )
            what = f"party {party}: epoch {epoch + 1} loss and accuracy"
            noise = 0.0 if privacy is None else privacy.scale
            agreed(
                "wrap-around check", job.party_names,
                lambda: _check_metrics(opened, limits, split_rows, classes=job.model.num_classes, noise=noise, what=what),
            )
            if opened is not None:
                record.update(_metrics(opened, n_rows, None if shared.x_test is None else shared.x_test.size(0)))
        comm_after = communication_stats()
        record.update(
            seconds=time.perf_counter() - started,
            rounds=comm_after["rounds"] - comm_before["rounds"],
            bytes=comm_after["bytes"] - comm_before["bytes"],
        )
        result.history.append(record)
        params, momentum = checkpoint.state_of(model, optimizer)
        checkpoint.save(job, party, rank, checkpoint.Checkpoint(epoch + 1, params, momentum, result.history))
        log.info("epoch %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    model_ranks = job.ranks(job.outputs.model_to)
    if model_ranks:
        privacy = dp_sgd.model_privacy() if dp_sgd is not None else None
        result.state_dict = reveal_state_dict(model, torch_model, to=model_ranks, privacy=privacy)
        agreed(
            "wrap-around check", job.party_names,
            lambda: _check_weights(result.state_dict, limits, what=f"party {party}: trained model parameters"),
        )
    return result


def reveal_state_dict(
    model: Any, torch_model: torch.nn.Module, *, to: list[int], privacy: Privacy | None = None
) -> dict[str, torch.Tensor] | None:
    """Opens all parameters in one reveal; receivers get a plain torch ``state_dict``."""
    crypten = import_crypten()
    named = list(model.named_parameters())
    flat = crypten.cat([param.flatten() for _, param in named])
    opened = reveal(flat, to=to, what="trained model parameters", privacy=privacy)
    if opened is None:
        return None
    state, offset = {}, 0
    reference = torch_model.state_dict()
    for name, param in named:
        size = param.nelement()
        state[name] = opened[offset : offset + size].reshape(reference[name].shape).float().cpu()
        offset += size
    return state
