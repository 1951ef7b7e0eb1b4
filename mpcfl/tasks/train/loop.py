"""Secure training: mini-batch SGD under MPC on secret-shared data.

The batch order is a public permutation from the job's seed, so every party
indexes the same rows; a strategy that samples its batches in secret (DP-SGD with
``dp.sampling: poisson``) gives every step all rows instead, weighted by its bits. Per-epoch metrics are computed under MPC over whole
splits and leave MPC only as aggregates, through :func:`mpcfl.mpc.reveal.reveal`,
to the job's metric receivers. The loop knows nothing of DP: its
:class:`~mpcfl.tasks.train.steps.TrainingStep` sets each batch's gradients and
says what the reveals cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mpcfl.jobs.schema import TrainJob
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.heads import Head, job_head
from mpcfl.mpc import fixed_mask
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import Privacy, budget_state, reveal, spend
from mpcfl.mpc.session import agreed, communication_stats, prefetching
from mpcfl.outputs import progress_bars
from mpcfl.tasks.train import checkpoint, metrics
from mpcfl.tasks.train.bounds import Bounds, check_revealed, safe_input_norm, training_bounds
from mpcfl.tasks.train.dataset import SharedData
from mpcfl.tasks.train.steps import TrainingStep

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one party ends training with."""

    model: Any  # the encrypted crypten model; its parameters are this party's shares
    torch_model: torch.nn.Module  # the architecture, for receivers to load weights into
    n_features: int
    feature_counts: list[int] = field(default_factory=list)  # every party's feature columns (public)
    history: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None  # revealed weights, receivers only
    metrics_release: dict[str, Any] = field(default_factory=dict)  # how metrics were released (metrics.json)


def batches(n_rows: int, *, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Row indices of each batch in one epoch; the same at every party (and in plaintext)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def _clip(values: Any, bound: float) -> Any:
    """Each value clipped to [0, bound] under MPC."""
    return values.relu() - (values - bound).relu()


def _loss_and_summary(head: Head, logits: Any, y: Any, *, loss_bound: float | None) -> list[Any]:
    """Summed loss and summed summary (correct predictions, or a regression's absolute errors) over a
    whole split's logits, still encrypted.

    With ``loss_bound`` each example's loss (and absolute error) is clipped to [0, loss_bound] first,
    so one record moves each sum by at most that much (the sensitivity DP metrics rely on).
    """
    losses = head.secure_example_losses(logits, y)
    summaries = head.secure_summaries(logits, y)
    if loss_bound is not None:
        losses = _clip(losses, loss_bound)
        if not head.classifies:  # a hit is already 0 or 1
            summaries = _clip(summaries, loss_bound)
    return [losses.sum().reshape(1), summaries.sum().reshape(1)]


def _metrics(opened: torch.Tensor, head: Head, n_train: int, n_test: int | None) -> dict[str, float]:
    """Means from the revealed sums, a regression's absolute error in the label's units. DP noise can
    push them out of range; clamping them back is post-processing, so it costs no privacy."""
    sums = opened.double().tolist()

    def summary(total: float, rows: int) -> float:
        mean = max(total / rows, 0.0)
        return min(mean, 1.0) if head.classifies else mean * head.label_scale

    record = {"loss": max(sums[0] / n_train, 0.0), f"train_{head.summary}": summary(sums[1], n_train)}
    if n_test is not None:
        record.update({"test_loss": max(sums[2] / n_test, 0.0), f"test_{head.summary}": summary(sums[3], n_test)})
    return record


# DP noise on revealed metrics moves them legitimately; this many noise scales is beyond
# any draw a run will see (Gaussian or Laplace tails e^-40 and below).
_NOISE_SLACK = 40.0


def _check_metrics(
    opened: torch.Tensor | None, limits: Bounds, rows: list[int], *, head: Head, noise: float, what: str
) -> None:
    """Receivers only: refuse revealed [loss sum, summary sum] pairs that show wrap-around.

    A loss sum is at least 0 and at most ``limits.loss_sum``; a count of hits lies in [0, rows], a
    sum of absolute errors in [0, rows x the head's summary bound]. The slack covers CrypTen's
    approximations (1e-2 per example) and any DP noise.
    """
    if opened is None:
        return
    low, high = [], []
    for n in rows:
        slack = 0.01 * n + _NOISE_SLACK * noise
        low += [-slack, -slack]
        high += [limits.loss_sum(n, head) + slack, n * head.summary_bound(limits.logit) + slack]
    if opened.numel() > len(low):  # the metrics' counts of the reported split (no noise)
        count_low, count_high = metrics.count_range(head, rows[-1], limits.logit)
        low += count_low
        high += count_high
    check_revealed(opened, what=what, low=low, high=high)


def _warn_if_chance(record: dict[str, float], head: Head, *, noise: float, rows: int) -> None:
    """Metric receivers: warn when the final model is barely better than guessing among its
    classes (within 20% of 1/classes, beyond the metrics' own noise), as a model that predicts
    one class is; class frequencies are private, so chance is taken as uniform."""
    accuracy = record.get("test_accuracy", record.get("train_accuracy"))
    if head.classifies and accuracy is not None and accuracy < 1.2 / head.classes + 3 * noise / rows:
        log.warning(
            "the trained model is barely better than chance (accuracy %.3g with %d classes): check the features' "
            "scale (data.scaling, data.max_abs), training.learning_rate and epochs, or, under DP, the budget",
            accuracy, head.classes,
        )


def _check_weights(state: dict[str, torch.Tensor] | None, limits: Bounds, *, what: str) -> None:
    """Model receivers only: refuse revealed parameters beyond the weight bound."""
    if state is not None:
        check_revealed(torch.cat([t.flatten() for t in state.values()]), what=what, low=-limits.weight, high=limits.weight)


def train(
    job: TrainJob,
    shared: SharedData,
    *,
    engine: TrainingStep,
    rank: int,
    party: str,
    device: torch.device,
    resume: checkpoint.Checkpoint | None = None,
    attempt: int = 0,
) -> TrainResult:
    """Trains the job's model on secret-shared data; every party calls it together.

    ``engine`` (:func:`mpcfl.tasks.train.dp_sgd.training_step`) sets each batch's
    gradients and prices the metrics and model reveals.

    After each epoch the party checkpoints its shares (see :mod:`mpcfl.tasks.train.checkpoint`);
    with ``resume`` it continues after the checkpoint's epoch. ``attempt``: this attempt's id, written
    into each checkpoint (:func:`~mpcfl.tasks.train.checkpoint.new_attempt`). The model lives on ``device``,
    where ``shared`` was shared (:func:`mpcfl.mpc.session.session_device`).

    Returns:
        The encrypted model, the per-epoch history (metrics only on metric
        receivers; communication figures on every party), and the revealed
        ``state_dict`` on model receivers.
    """
    crypten = import_crypten()
    spec = job.training
    torch_model = build_torch_model(job.model, n_features=shared.n_features, seed=spec.seed)
    model = to_crypten(torch_model).encrypt(src=0).to(device)
    model.train()
    optimizer = crypten.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    head = job_head(job)
    metric_ranks = job.ranks(job.outputs.metrics_to)
    n_rows = shared.x_train.size(0)
    split_rows = [n_rows] + ([] if shared.x_test is None else [shared.x_test.size(0)])
    # What the range check before sharing guarantees; revealed values beyond it wrapped.
    safe_norm = safe_input_norm(job, n_features=shared.n_features, n_rows=n_rows, metric_rows=max(split_rows))
    limits = training_bounds(job, n_features=shared.n_features, n_rows=n_rows, input_norm=safe_norm)
    result = TrainResult(
        model=model, torch_model=torch_model, n_features=shared.n_features, feature_counts=shared.feature_counts,
        metrics_release=engine.metrics_release(),
    )
    first = 0
    if resume is not None:
        checkpoint.restore(model, optimizer, resume, device=device)
        result.history, first = list(resume.history), resume.epoch
    else:
        engine.project(model)  # the initial weights too: every step's bounds hold from the first
        if spec.momentum:
            # Zero momentum to start (the same update: 0 m + g = g), so the first step asks the dealer
            # what every later step asks (crypten's SGD copies the first gradient instead, two fewer
            # truncations) and the prefetched recording of a step fits the next.
            for param in model.parameters():
                optimizer.state[id(param)]["momentum_buffer"] = param.detach().mul(0)

    if job.runtime.mask_reuse:
        # Bound to this job's training features: the dealer keeps one mask per binding per run.
        data = fixed_mask.binding(job.fingerprint(), "training features", *shared.x_train.size())
        fixed_mask.fix(shared.x_train, data)
    for epoch in range(first, spec.epochs):
        started, comm_before = time.perf_counter(), communication_stats()
        steps = engine.secret_batches(n_rows, device=device)
        if steps is None:
            plan = batches(n_rows, batch_size=spec.batch_size, seed=spec.seed, epoch=epoch, shuffle=spec.shuffle)
        else:  # secret batches: every step sees every row, weighted by bits it never opens
            plan = [np.arange(n_rows)] * steps
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{spec.epochs}", unit="batch", disable=rank != 0 or not progress_bars(), mininterval=1.0)
        for rows in bar:
            index = torch.from_numpy(rows).to(device)
            with prefetching(len(rows), enabled=job.runtime.prefetch):
                optimizer.zero_grad()
                engine.step(model, torch_model, fixed_mask.rows(shared.x_train, index), shared.y_train[index])
                optimizer.step()
                engine.project(model)
        # Charged now, before the metrics and the checkpoint: every later release depends on
        # these steps. A crash before the checkpoint: the resume redoes the epoch with fresh noise
        # and drops this charge unless some party recorded a release after it (runner.drop_unreleased).
        if (cost := engine.epoch_charge()) is not None:
            spend(f"epoch {epoch + 1} DP-SGD steps", cost)
        record: dict[str, float] = {"epoch": epoch + 1}
        if metric_ranks and engine.releases_metrics(epoch, spec.epochs):
            privacy = engine.metrics_privacy()
            # AUC, F1, precision, recall and the confusion matrix, as counts, on the test split (else the
            # training split); not under DP, whose charge covers the loss and accuracy only
            with crypten.no_grad():
                splits = [(model(shared.x_train), shared.y_train)]
                if shared.x_test is not None:
                    splits.append((model(shared.x_test), shared.y_test))
                parts = [p for logits, y in splits for p in _loss_and_summary(head, logits, y, loss_bound=engine.loss_bound)]
                if privacy is None:
                    parts.append(metrics.secure_counts(head, *splits[-1]))
            opened = reveal(
                crypten.cat(parts), to=metric_ranks, what=f"epoch {epoch + 1} loss and accuracy", privacy=privacy
            )
            what = f"party {party}: epoch {epoch + 1} loss and accuracy"
            noise = 0.0 if privacy is None else privacy.scale
            agreed(
                "wrap-around check", job.party_names,
                lambda: _check_metrics(opened, limits, split_rows, head=head, noise=noise, what=what),
            )
            if opened is not None:
                record.update(_metrics(opened, head, n_rows, None if shared.x_test is None else shared.x_test.size(0)))
                if privacy is None:
                    prefix = "test_" if shared.x_test is not None else "train_"
                    record.update(metrics.derive(head, opened[2 * len(split_rows):], split_rows[-1], prefix=prefix))
                if epoch == spec.epochs - 1:
                    _warn_if_chance(record, head, noise=noise, rows=split_rows[-1])
        comm_after = communication_stats()
        record.update(
            seconds=time.perf_counter() - started,
            rounds=comm_after["rounds"] - comm_before["rounds"],
            bytes=comm_after["bytes"] - comm_before["bytes"],
        )
        result.history.append(record)
        params, momentum = checkpoint.state_of(model, optimizer)
        state = checkpoint.Checkpoint(epoch + 1, params, momentum, result.history, privacy=budget_state(), center=shared.center,
                                      attempt=attempt)
        checkpoint.save(job, party, rank, state)
        log.info("epoch %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    model_ranks = job.ranks(job.outputs.model_to)
    if model_ranks:
        result.state_dict = reveal_state_dict(model, torch_model, to=model_ranks, privacy=engine.model_privacy())
        agreed(
            "wrap-around check", job.party_names,
            lambda: _check_weights(result.state_dict, limits, what=f"party {party}: trained model parameters"),
        )
        if result.state_dict is not None:
            # A module's buffers (and parameters its forward never uses) are not trained: their
            # public initial values complete the state_dict, so it loads into the module as it is.
            result.state_dict = {**torch_model.state_dict(), **result.state_dict}
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
