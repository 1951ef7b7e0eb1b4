"""Party and dealer process set-up: the environment contract, CrypTen's start and stop.

CrypTen reads RANK, WORLD_SIZE, RENDEZVOUS and DISTRIBUTED_BACKEND from the
environment. Parties take ranks 0..n-1 in job order; the dealer (CrypTen's TTP)
is rank n of a process group of n+1. Everything here runs inside one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from mpcfl._compat import import_crypten, set_process_group_timeout
from mpcfl.config import JobSpec
from mpcfl.errors import MpcflError, PeerFailure

log = logging.getLogger(__name__)

_PEER_FAILURES = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "Timeout")


def _set_env(job: JobSpec, *, rank: int, rendezvous: str | None, who: str) -> None:
    """Fills CrypTen's environment contract, refusing values that contradict the job."""
    for key, expected in (("RANK", rank), ("WORLD_SIZE", job.world_size)):
        given = os.environ.get(key)
        if given is not None and given != str(expected):
            raise MpcflError(
                f"{who}: environment {key}={given} does not match the job {job.source} "
                f"({key.lower()} {expected}; {job.world_size} parties plus the dealer)"
            )
        os.environ[key] = str(expected)
    rendezvous = rendezvous or os.environ.get("RENDEZVOUS")
    if not rendezvous:
        raise MpcflError(f"{who}: no rendezvous: pass --rendezvous tcp://HOST:PORT or set RENDEZVOUS")
    if not rendezvous.startswith(("tcp://", "file://", "env://")):
        raise MpcflError(f"{who}: rendezvous {rendezvous!r} must start with tcp://, file:// or env://")
    os.environ["RENDEZVOUS"] = rendezvous
    os.environ["DISTRIBUTED_BACKEND"] = "gloo"


def _configure(job: JobSpec) -> Any:
    crypten = import_crypten()
    from crypten.config import cfg

    set_process_group_timeout(job.runtime.timeout_s)
    cfg.mpc.provider = "TFP" if job.runtime.insecure_dealer else "TTP"
    cfg.communicator.verbose = True
    return crypten


def _translate(err: RuntimeError, who: str, job: JobSpec) -> MpcflError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if any(marker in str(err) for marker in _PEER_FAILURES):
        return PeerFailure(
            f"{who}: lost a peer of job {job.name} (it died, hung past "
            f"runtime.timeout_s={job.runtime.timeout_s:g}s, or the link was cut): {text}"
        )
    return MpcflError(f"{who}: {text}")


@contextlib.contextmanager
def _crypten_session(crypten: Any, job: JobSpec, who: str) -> Iterator[None]:
    """Turns gloo's errors into one-line ones and always leaves the process group.

    A process that exits without ``crypten.uninit()`` can abort in gloo's threads.
    """
    try:
        yield
    except RuntimeError as err:
        raise _translate(err, who, job) from err
    finally:
        if crypten.is_initialized():
            with contextlib.suppress(RuntimeError):
                crypten.uninit()


@contextlib.contextmanager
def party_session(job: JobSpec, party: str, *, rendezvous: str | None = None) -> Iterator[int]:
    """Joins the job's process group as ``party`` and yields its rank.

    Raises:
        MpcflError: the environment contradicts the job.
        PeerFailure: a peer failed while the session was open.
    """
    rank = job.rank_of(party)
    who = f"party {party}"
    _set_env(job, rank=rank, rendezvous=rendezvous, who=who)
    crypten = _configure(job)
    if job.runtime.insecure_dealer:
        log.warning(
            "INSECURE: runtime.insecure_dealer is set, so party %s generates every Beaver "
            "triple and can see all secrets. Use only for tests.", job.party_names[0]
        )
    if job.runtime.device == "cuda" and not torch.cuda.is_available():
        raise MpcflError(f"{who}: runtime.device is cuda but torch sees no GPU")
    with _crypten_session(crypten, job, who):
        crypten.init()
        log.info("joined job %s as rank %d of %d", job.name, rank, job.world_size)
        yield rank


def run_dealer(job: JobSpec, *, rendezvous: str | None = None) -> None:
    """Serves Beaver triples to the parties until party 0 ends the job.

    Raises:
        MpcflError: the job runs without a dealer, or the environment contradicts it.
    """
    who = "dealer"
    if job.runtime.insecure_dealer:
        raise MpcflError(f"{who}: job {job.source} sets runtime.insecure_dealer, so it runs without a dealer")
    _set_env(job, rank=job.world_size, rendezvous=rendezvous, who=who)
    crypten = _configure(job)
    with _crypten_session(crypten, job, who):
        crypten.mpc.provider.TTPServer()  # returns when party 0 sends "terminate"
    log.info("dealer finished")


def all_gather_public(values: list[int]) -> list[list[int]]:
    """Exchanges small public integers (shapes, status flags) among the parties.

    Tensors, not pickles, so a peer cannot make us unpickle arbitrary objects.
    """
    comm = import_crypten().comm.get()
    gathered = comm.all_gather(torch.tensor(values, dtype=torch.long))
    return [t.tolist() for t in gathered]


def agree(ok: bool, *, job: JobSpec, stage: str) -> None:
    """All parties learn whether each one finished ``stage``; a failure stops everyone.

    Raises:
        PeerFailure: another party reported failure (its own process reports why).
    """
    flags = all_gather_public([int(ok)])
    failed = [job.party_names[r] for r, (flag,) in enumerate(flags) if not flag]
    if failed and ok:
        raise PeerFailure(f"party {', '.join(failed)} failed during {stage}; see its log")


def communication_stats() -> dict[str, float]:
    """This process's communication so far: rounds, bytes sent, seconds in comms."""
    stats = import_crypten().comm.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]), "comm_time_s": float(stats["time"])}
