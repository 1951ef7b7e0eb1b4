"""Per-party checkpoints of federated training, one after each round.

What a party holds after a round is public to every party (the global weights, the strategy's
state, both computed from revealed averages) plus its own history and the privacy ledger, so the
checkpoint is plaintext: ``<outputs>/<party>/checkpoints/round-NNNN.pt``, plain tensors that
``torch.load(weights_only=True)`` reads. The last two are kept, and a resume continues after the
newest round every party holds (as :mod:`mpcfl.tasks.train.checkpoint` does for epochs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpcfl.jobs.schema import FederatedJob
from mpcfl.outputs import write_torch
from mpcfl.tasks.train.checkpoint import read_own, with_attempts

_KEEP = 2
_NAME = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass
class RoundCheckpoint:
    """A party's state after ``round`` completed rounds."""

    round: int
    weights: torch.Tensor  # the global model, flat, float64
    strategy: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    privacy: dict[str, Any] | None = None  # the budget and ledger as of this round
    attempt: int = 0  # the attempt at the run that wrote it (mpcfl.tasks.train.checkpoint.new_attempt)


def _folder(job: FederatedJob, party: str) -> Path:
    return job.party_dir(party) / "checkpoints"


def _path(job: FederatedJob, party: str, round_index: int) -> Path:
    return _folder(job, party) / f"round-{round_index:04d}.pt"


def available_rounds(job: FederatedJob, party: str) -> list[int]:
    """Rounds this party holds checkpoints for, newest first."""
    where = _folder(job, party)
    if not where.is_dir():
        return []
    return sorted((int(m.group(1)) for p in where.iterdir() if (m := _NAME.match(p.name))), reverse=True)


def save(job: FederatedJob, party: str, rank: int, checkpoint: RoundCheckpoint) -> None:
    """Writes this party's checkpoint atomically and prunes older ones."""
    write_torch(_path(job, party, checkpoint.round), {
        "fingerprint": job.fingerprint(), "run": job.run_id, "job": job.name, "party": party, "rank": rank,
        "round": checkpoint.round, "weights": checkpoint.weights, "strategy": checkpoint.strategy,
        "history": checkpoint.history, "privacy": checkpoint.privacy, "attempt": checkpoint.attempt,
    })
    for old in available_rounds(job, party)[_KEEP:]:
        _path(job, party, old).unlink(missing_ok=True)


def load(job: FederatedJob, party: str, rank: int, round_index: int) -> RoundCheckpoint:
    """Reads this party's checkpoint of ``round_index``, refusing one of another job or party.

    Raises:
        MpcflError: unreadable, or written by another job, configuration or party.
    """
    data = read_own(job, party, rank, _path(job, party, round_index))
    return RoundCheckpoint(
        round=data["round"], weights=data["weights"], strategy=data["strategy"], history=data["history"],
        privacy=data.get("privacy"), attempt=int(data.get("attempt", 0)),
    )


def held_rounds(job: FederatedJob, party: str, rank: int) -> list[tuple[int, int]]:
    """This party's checkpoints as (round, attempt) pairs, newest first."""
    return with_attempts(job, party, rank, [(r, _path(job, party, r)) for r in available_rounds(job, party)])
