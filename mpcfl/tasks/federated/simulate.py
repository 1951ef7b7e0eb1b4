"""The same federated rounds in plaintext, in one process: the reference for tests and comparisons.

It reads every party's files, so it is a measurement tool, never part of a secure run. It mirrors
the secure path step by step (pooled standardisation or the public scaling, the seeded initial
model, each party's local training and checks, the strategy), with the exact weighted average
where the secure run computes it under MPC, and no noise where a DP run adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mpcfl.data.party import PartyData, apply_scaler, load_party_data, scale_publicly
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import FederatedJob
from mpcfl.models.heads import Head, head_of
from mpcfl.tasks.federated.aggregate import MAX_AVERAGED
from mpcfl.tasks.federated.local import Rows, flat, initial_model, load_flat, local_update
from mpcfl.tasks.federated.strategies import Strategy, strategy_of


@dataclass
class PlainRun:
    """The global weights before round 1 and after each round, each round's average and who took part."""

    weights: list[torch.Tensor] = field(default_factory=list)
    averages: list[torch.Tensor] = field(default_factory=list)
    live: list[list[int]] = field(default_factory=list)


def prepared_parties(job: FederatedJob) -> list[PartyData]:
    """Every party's data, scaled as the secure run scales it (standardisation over the pooled rows)."""
    parts = [load_party_data(job, name) for name in job.party_names]
    if job.data.standardize:
        pooled = np.vstack([part.train.x for part in parts])
        for part in parts:
            apply_scaler(part, pooled.mean(axis=0), pooled.std(axis=0))
    elif job.data.scaling is not None:
        for part in parts:
            scale_publicly(part, job.data.scaling, job.source)
    return parts


def plain_round(
    job: FederatedJob, model: torch.nn.Module, rows: list[Rows], head: Head, strategy: Strategy, *,
    weights: torch.Tensor, round_index: int,
) -> tuple[torch.Tensor, list[int]]:
    """One round's exact average (over the parties whose update passed its checks) and their ranks.

    Raises:
        MpcflError: a party's update failed and the job allows no dropouts.
    """
    clip = None if job.dp is None else job.dp.clip
    updates, counts, live = [], [], []
    for rank, party_rows in enumerate(rows):
        who = f"party {job.party_names[rank]}: round {round_index}"
        try:
            update, _ = local_update(
                job, model, party_rows, head, strategy, weights=weights, round_index=round_index, rank=rank,
                clip=clip, bound=MAX_AVERAGED, who=who,
            )
        except MpcflError:
            if not job.federated.allow_dropouts:
                raise
            continue
        updates.append(update)
        counts.append(1.0 if clip is not None else float(party_rows.x.shape[0]))
        live.append(rank)
    weight = torch.tensor(counts, dtype=torch.float64)
    return (torch.stack(updates) * weight[:, None]).sum(dim=0) / weight.sum(), live


def simulate(job: FederatedJob) -> PlainRun:
    """Every round of the job in plaintext."""
    parts = prepared_parties(job)
    head = head_of(job.model)
    rows = [Rows.of(part.train, head) for part in parts]
    model = initial_model(job, parts[0].train.x.shape[1])
    strategy = strategy_of(job.federated.strategy)
    run = PlainRun(weights=[flat(model)])
    for round_index in range(1, job.federated.rounds + 1):
        average, live = plain_round(job, model, rows, head, strategy, weights=run.weights[-1], round_index=round_index)
        run.averages.append(average)
        run.live.append(live)
        run.weights.append(strategy.apply(run.weights[-1], average))
    load_flat(model, run.weights[-1])
    return run
