"""The torchrun / Slurm contract: one ``mpcfl worker`` per process, its role read from the environment."""

from __future__ import annotations

import logging
import os

from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import JobBase
from mpcfl.mpc import providers
from mpcfl.mpc.compat import ENV_RANK, ENV_WORLD_SIZE


def role_from_launcher_env(job: JobBase) -> tuple[str, str]:
    """This process's role under torchrun or Slurm, and the rendezvous to use.

    torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; Slurm's srun sets
    SLURM_PROCID and SLURM_NTASKS (export MASTER_ADDR and MASTER_PORT in the batch
    script). Their world counts every process, so it is the job's parties plus the
    dealer: ranks 0..n-1 are the parties in job order and rank n is the dealer.
    CrypTen's own WORLD_SIZE counts the parties only, so it is rewritten here.

    Returns:
        (party name or ``"dealer"``, ``"env://"``).

    Raises:
        MpcflError: the variables are missing or contradict the job.
    """
    if ENV_RANK in os.environ and ENV_WORLD_SIZE in os.environ:
        rank, total, source = os.environ[ENV_RANK], os.environ[ENV_WORLD_SIZE], "RANK/WORLD_SIZE (torchrun)"
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, total, source = os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"], "SLURM_PROCID/SLURM_NTASKS"
    else:
        raise MpcflError("worker: set RANK and WORLD_SIZE (torchrun) or SLURM_PROCID and SLURM_NTASKS (srun)")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(key)]
    if missing:
        raise MpcflError(f"worker: {' and '.join(missing)} must be set (the host and port of rank 0)")
    provider = providers.get(job.runtime.provider)
    processes = provider.processes(job.party_names)
    if int(total) != len(processes):
        raise MpcflError(
            f"worker: {source} gives a world of {total} processes, but job {job.source} needs {len(processes)}: "
            f"{job.world_size} parties" + (" plus the dealer" if provider.needs_dealer else "")
        )
    rank_number = int(rank)
    os.environ[ENV_RANK] = str(rank_number)
    os.environ[ENV_WORLD_SIZE] = str(job.world_size)
    role = processes[rank_number]
    return role, "env://"


def prefix_log_lines(role: str) -> None:
    """Starts each of this process's log lines with ``[role] ``, as the local launcher prefixes its children's
    output: torchrun and srun interleave every rank's lines on one console."""
    for handler in logging.getLogger().handlers:
        form = handler.formatter._fmt if handler.formatter is not None and handler.formatter._fmt else "%(message)s"
        if not form.startswith(f"[{role}] "):
            handler.setFormatter(logging.Formatter(f"[{role}] {form}"))
