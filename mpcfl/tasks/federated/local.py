"""A party's local round in plain PyTorch on its own rows: no MPC, nothing leaves the process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mpcfl.data.party import Split
from mpcfl.dp.clipping import clip_rows
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import FederatedJob, FederatedSpec
from mpcfl.models.build import build_torch_model
from mpcfl.models.heads import Head
from mpcfl.tasks.federated.aggregate import check_update
from mpcfl.tasks.federated.strategies import Strategy

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """One split as torch tensors: float32 features, the head's plain targets."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def of(cls, split: Split, head: Head) -> Rows:
        return cls(torch.tensor(np.asarray(split.x), dtype=torch.float32), head.plain_targets(split.y))


def initial_model(job: FederatedJob, n_features: int) -> nn.Module:
    """The public starting model: the same weights at every party (seeded by ``federated.seed``)."""
    return build_torch_model(job.model, n_features=n_features, seed=job.federated.seed)


def flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one float64 vector (buffers, e.g. batch-norm statistics, are not averaged)."""
    return parameters_to_vector(model.parameters()).detach().double()


def load_flat(model: nn.Module, weights: torch.Tensor) -> None:
    """Sets the model's parameters from a flat vector."""
    vector_to_parameters(weights.to(next(model.parameters()).dtype), model.parameters())


def train_locally(
    model: nn.Module, rows: Rows, *, head: Head, spec: FederatedSpec, strategy: Strategy, seed: int
) -> float:
    """``spec.local_epochs`` epochs of minibatch training from the model's current (global) weights, in place.

    The batch order is drawn from ``seed`` (a local, public choice: it hides nothing).

    Returns:
        The mean training loss of the last local epoch.
    """
    start = flat(model).float()
    params = list(model.parameters())
    if spec.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=spec.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    n = rows.x.shape[0]
    total = 0.0
    for _ in range(spec.local_epochs):
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(spec.batch_size):
            optimizer.zero_grad()
            loss = head.plain_loss(model(rows.x[batch]), rows.y[batch])
            total += float(loss.detach()) * len(batch)
            penalty = strategy.local_penalty(parameters_to_vector(params), start)
            (loss if penalty is None else loss + penalty).backward()
            optimizer.step()
    return total / max(n, 1)


def local_seed(seed: int, round_index: int, rank: int) -> int:
    """The seed of a party's batch order in a round: distinct per party and round, reproducible."""
    return (seed * 1_000_003 + round_index) * 1009 + rank


def evaluate(model: nn.Module, rows: Rows, head: Head) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``rows``."""
    model.eval()
    with torch.no_grad():
        logits = model(rows.x)
        return float(head.plain_loss(logits, rows.y)), float(head.plain_hits(logits, rows.y).float().mean())


def local_update(
    job: FederatedJob, model: nn.Module, rows: Rows, head: Head, strategy: Strategy, *,
    weights: torch.Tensor, round_index: int, rank: int, clip: float | None, bound: float, who: str,
) -> tuple[torch.Tensor, float]:
    """One party's update of one round from the global ``weights``, and its local training loss.

    With DP (``clip``), the update is clipped to L2 norm ``clip`` (a non-finite one counts as zero:
    refusing it would publish a data-dependent bit); without, it is refused beyond ``bound``
    (:data:`~mpcfl.tasks.federated.aggregate.MAX_AVERAGED`) or if not finite.

    Raises:
        MpcflError: local training raised (the user's module, diverged arithmetic), or, without DP,
            the update is not finite or out of bounds; names ``who``.
    """
    load_flat(model, weights)
    try:
        loss = train_locally(
            model, rows, head=head, spec=job.federated, strategy=strategy,
            seed=local_seed(job.federated.seed, round_index, rank),
        )
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MpcflError(f"{who}: local training failed: {type(err).__name__}: {first}") from None
    update = flat(model) - weights
    if clip is None:
        check_update(update, bound=bound, who=who)
        return update, loss
    if not torch.isfinite(update).all():
        # Under DP, "my update is unusable" would be a public, data-dependent bit outside the
        # guarantee: a diverged update counts as the zero update instead (within the clip), and
        # only this party's log says so.
        log.warning("%s: the local update is not finite (local training diverged); it counts as zero", who)
        return torch.zeros_like(update), loss
    return torch.from_numpy(clip_rows(update.numpy()[None, :], clip)[0]), loss
