"""Per-party checkpoints of secure training, and resuming from them.

After every epoch each party writes, atomically, its own arithmetic shares of the
model and of the optimizer's momentum, the history so far, and the epoch, into the run's
``<outputs>/<party>/<run-id>/checkpoints/epoch-NNNN.pt``; a checkpoint names its run, and one of another run is refused. Shares
are plain int64 tensors with metadata, so ``torch.load(weights_only=True)`` reads
them without unpickling code. The last two checkpoints are kept: a crash can hit
after one party saved epoch k and before another did, and resuming then uses the
newest epoch every party holds from one attempt at the run (:func:`new_attempt`: its start
or a resume): a crash in a resumed attempt can leave one party's epoch k from it and
another's from the attempt before, shares of different sharings.

Randomness is not restored on purpose: share masks, Beaver triples and DP noise
are drawn fresh after a resume (restoring a noise generator's state from disk
would make the noise predictable to whoever reads the file). The batch order is
a function of the public seed and the epoch, so it continues exactly. The DP
ledger is part of the state: each checkpoint holds the ledger as of its epoch,
and ``privacy.json``, rewritten at every charge, holds the newest. A resume needs
both and that the file extends the checkpoint's ledger (the runner refuses it
otherwise), and it continues from the file, so a release made after the last
checkpoint is never lost, and one that is repeated after a resume (new noise, a
new release) is charged again. What follows the checkpoint is dropped when no
party recorded a release among it (:func:`mpcfl.tasks.train.runner.drop_unreleased`):
an epoch's DP-SGD steps, charged as they end, then a crash before the checkpoint. The resumed model therefore equals an uninterrupted run's up to fixed point's
probabilistic truncation (and, with DP, up to the fresh noise).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpcfl.jobs.schema import JobBase, TrainJob
from mpcfl.errors import MpcflError
from mpcfl.mpc.device import to_device, to_host
from mpcfl.outputs import write_torch

log = logging.getLogger(__name__)

_KEEP = 2
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


@dataclass
class Checkpoint:
    """One party's state after ``epoch`` completed epochs."""

    epoch: int
    params: dict[str, torch.Tensor]  # this party's shares, by parameter name
    momentum: dict[str, torch.Tensor]  # shares of the optimizer's momentum buffers
    history: list[dict[str, float]]
    privacy: dict[str, Any] | None = None  # the budget and ledger as of this epoch (a DP job's)
    center: list[float] | None = None  # dp.center's opened mean, which a resume reuses rather than opens again
    attempt: int = 0  # the attempt at the run that wrote it (:func:`new_attempt`)


def folder(job: TrainJob, party: str) -> Path:
    return job.party_dir(party) / "checkpoints"


def available_epochs(job: TrainJob, party: str) -> list[int]:
    """Epochs this party holds checkpoints for, newest first."""
    where = folder(job, party)
    if not where.is_dir():
        return []
    epochs = [int(m.group(1)) for p in where.iterdir() if (m := _NAME.match(p.name))]
    return sorted(epochs, reverse=True)


def save(job: TrainJob, party: str, rank: int, checkpoint: Checkpoint) -> None:
    """Writes this party's checkpoint atomically and prunes older ones."""
    payload = {
        "fingerprint": job.fingerprint(),
        "run": job.run_id,
        "job": job.name,
        "party": party,
        "rank": rank,
        "epoch": checkpoint.epoch,
        "params": checkpoint.params,
        "momentum": checkpoint.momentum,
        "history": checkpoint.history,
        "privacy": checkpoint.privacy,
        "center": checkpoint.center,
        "attempt": checkpoint.attempt,
    }
    write_torch(folder(job, party) / f"epoch-{checkpoint.epoch:04d}.pt", payload)
    for old in available_epochs(job, party)[_KEEP:]:
        (folder(job, party) / f"epoch-{old:04d}.pt").unlink(missing_ok=True)


def read_own(job: JobBase, party: str, rank: int, path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, refusing one of another job, configuration, run or party.

    Raises:
        MpcflError: unreadable, or written by another job, config, run or party.
    """
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise MpcflError(f"party {party}: {path}: cannot read checkpoint: {str(err).splitlines()[0]}") from None
    if data.get("fingerprint") != job.fingerprint():
        raise MpcflError(
            f"party {party}: {path}: written by job {data.get('job')!r} with a different configuration; "
            f"refusing to resume from it (delete it to start afresh)"
        )
    _refuse_other_run(job, party, path, data)
    if (data.get("party"), data.get("rank")) != (party, rank):
        raise MpcflError(f"party {party}: {path}: belongs to party {data.get('party')!r} (rank {data.get('rank')})")
    return data


def _refuse_other_run(job: JobBase, party: str, path: Path, data: dict[str, Any]) -> None:
    if data.get("run") != job.run_id:
        raise MpcflError(f"party {party}: {path}: written by run {data.get('run')}, not this run ({job.run_id}); refusing it")


def load(job: TrainJob, party: str, rank: int, epoch: int) -> Checkpoint:
    """Reads this party's checkpoint for ``epoch``, refusing one of another job or party.

    Raises:
        MpcflError: unreadable, or written by another job, config or party.
    """
    data = read_own(job, party, rank, folder(job, party) / f"epoch-{epoch:04d}.pt")
    return Checkpoint(
        epoch=data["epoch"], params=data["params"], momentum=data["momentum"], history=data["history"],
        privacy=data.get("privacy"), center=data.get("center"), attempt=int(data.get("attempt", 0)),
    )


def new_attempt() -> int:
    """A public id for this attempt at the run (its start, or a resume), the same at every party:
    rank 0's random draw, exchanged. Every party calls it at the same point."""
    from mpcfl.mpc.session import all_gather_public

    return all_gather_public([secrets.randbits(62)])[0][0]


def with_attempts(job: JobBase, party: str, rank: int, files: list[tuple[int, Path]]) -> list[tuple[int, int]]:
    """(epoch or round, attempt) for each of this party's numbered checkpoint ``files`` (attempt 0: written
    before attempts), as :func:`common_epoch` takes them."""
    return [(number, int(read_own(job, party, rank, path).get("attempt", 0))) for number, path in files]


def held(job: TrainJob, party: str, rank: int) -> list[tuple[int, int]]:
    """This party's checkpoints as (epoch, attempt) pairs, newest first."""
    return with_attempts(job, party, rank, [(e, folder(job, party) / f"epoch-{e:04d}.pt") for e in available_epochs(job, party)])


def common_epoch(job: JobBase, mine: list[tuple[int, int]]) -> int:
    """The newest epoch (or federated round) every party holds a checkpoint for, from ``mine``'s (epoch,
    attempt) pairs (exchanged as public integers): only checkpoints one attempt wrote at every party: a crash
    in a resumed attempt can leave one party's epoch k from it and another's from the attempt before,
    whose shares come from different sharings and would add up to garbage.

    Raises:
        MpcflError: some party has no checkpoint in common with the others.
    """
    from mpcfl.mpc.session import all_gather_public

    padded = [value for pair in (mine + [(-1, 0)] * _KEEP)[:_KEEP] for value in pair]
    everyone = [list(zip(flat[::2], flat[1::2])) for flat in all_gather_public(padded)]
    common = {pair for pair in everyone[0] if pair[0] >= 0}
    for other in everyone[1:]:
        common &= set(other)
    if not common:
        empty = [job.party_names[r] for r, other in enumerate(everyone) if max(e for e, _ in other) < 0]
        if empty:
            detail = f"{'parties' if len(empty) > 1 else 'party'} {', '.join(empty)} {'have' if len(empty) > 1 else 'has'} none"
        else:
            detail = "the parties hold different epochs"
        raise MpcflError(
            f"cannot resume run {job.run_id} of job {job.name}: no checkpoint common to all parties ({detail}); "
            "start a new run"
        )
    return max(epoch for epoch, _ in common)


def state_of(model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This party's shares of the parameters and of the momentum buffers, as plain CPU tensors."""
    params, momentum = {}, {}
    for name, param in model.named_parameters():
        params[name] = to_host(param.share)
        buffer = optimizer.state.get(id(param), {}).get("momentum_buffer")
        if buffer is not None:
            momentum[name] = to_host(buffer.share)
    return params, momentum


def restore(model: Any, optimizer: Any, checkpoint: Checkpoint, *, device: torch.device) -> None:
    """Puts the checkpoint's shares back into the (already encrypted) model and optimizer, on ``device``.

    Raises:
        MpcflError: the checkpoint's parameters do not match the model.
    """
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    named = dict(model.named_parameters())
    if set(named) != set(checkpoint.params):
        raise MpcflError(f"checkpoint parameters {sorted(checkpoint.params)} do not match the model's {sorted(named)}")
    for name, param in named.items():
        share = checkpoint.params[name]
        if share.shape != param.share.shape:
            raise MpcflError(f"checkpoint parameter {name} has shape {tuple(share.shape)}, the model {tuple(param.share.shape)}")
        param.share = to_device(share, device)
        if name in checkpoint.momentum:
            buffer = crypten.mpc.MPCTensor.from_shares(to_device(checkpoint.momentum[name], device))
            optimizer.state[id(param)]["momentum_buffer"] = buffer
