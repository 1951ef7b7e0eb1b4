"""Party and dealer process set-up: the environment contract, CrypTen's start and stop.

CrypTen reads RANK, WORLD_SIZE, RENDEZVOUS and DISTRIBUTED_BACKEND from the
environment. Parties take ranks 0..n-1 in the order a :class:`Session` lists
them; the dealer (CrypTen's TTP) is rank n of a process group of n+1.
Everything here runs inside one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from mpcfl.mpc.compat import import_crypten, init_crypten, run_dealer_server, set_process_group_timeout
from mpcfl.mpc.auth import Credentials, authenticate, load_secret
from mpcfl.errors import MpcflError, PeerFailure

log = logging.getLogger(__name__)

_PEER_FAILURES = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "Timeout", "timeout", "pair closure")
T = TypeVar("T")

# Set by `mpcfl launch` for party scripts, beside CrypTen's own variables.
ENV_PARTIES = "MPCFL_PARTIES"
ENV_PARTY = "MPCFL_PARTY"
ENV_TIMEOUT = "MPCFL_TIMEOUT_S"
ENV_INSECURE = "MPCFL_INSECURE_DEALER"
ENV_DEVICE = "MPCFL_DEVICE"


@dataclass(frozen=True)
class Session:
    """Who takes part in a computation and how the processes find each other.

    Args:
        parties: party names; a party's rank is its position.
        rendezvous: ``tcp://HOST:PORT`` shared by all processes; ``None`` reads ``$RENDEZVOUS``.
        timeout_s: process-group timeout: a peer silent this long fails the job.
        insecure_dealer: CrypTen's TFP instead of a dealer process: party 0 makes
            every Beaver triple and can see all secrets. For tests only.
        device: ``cpu`` or ``cuda``.
        label: names the job in error messages.
        credentials: what this process proves itself with (see :mod:`mpcfl.mpc.auth`).
        fingerprint: what every process's copy of the job agrees on.
    """

    parties: tuple[str, ...]
    rendezvous: str | None = None
    timeout_s: float = 60.0
    insecure_dealer: bool = False
    device: str = "cpu"
    label: str = "mpcfl"
    credentials: Credentials = field(default_factory=Credentials)
    fingerprint: str = ""

    @classmethod
    def from_env(cls) -> Session:
        """The session ``mpcfl launch`` describes in the environment.

        Raises:
            MpcflError: the process was not started by ``mpcfl launch``.
        """
        names = os.environ.get(ENV_PARTIES)
        if not names:
            raise MpcflError(f"{ENV_PARTIES} is not set: start party scripts with `mpcfl launch`, or pass parties=")
        return cls(
            parties=tuple(names.split(",")),
            timeout_s=float(os.environ.get(ENV_TIMEOUT, "60")),
            insecure_dealer=os.environ.get(ENV_INSECURE) == "1",
            device=os.environ.get(ENV_DEVICE, "cpu"),
            credentials=deferred_credentials(lambda: Credentials(secret=load_secret(None))),
            fingerprint=f"script session {names}",
        )

    @property
    def world_size(self) -> int:
        return len(self.parties)

    @property
    def process_names(self) -> list[str]:
        """Names by rank of every process in the group: the parties, then the dealer."""
        return [*self.parties, *([] if self.insecure_dealer else ["dealer"])]

    def authenticate(self, crypten: Any, rank: int) -> None:
        """Proves this process's identity and checks every peer's (see :mod:`mpcfl.mpc.auth`)."""
        authenticate(
            self.credentials, fingerprint=self.fingerprint, rank=rank, names=self.process_names,
            rendezvous=_rendezvous_seen(), group=crypten.comm.get().ttp_group,
        )

    def rank_of(self, name: str) -> int:
        """Raises MpcflError for a name that is not a party."""
        if name not in self.parties:
            raise MpcflError(f"{self.label}: no party named {name!r} (parties: {', '.join(self.parties)})")
        return self.parties.index(name)


def deferred_credentials(load: Callable[[], Credentials]) -> Credentials:
    """Credentials, or why there are none: the process still joins, so its peers refuse it at once."""
    try:
        return load()
    except MpcflError as err:
        return Credentials(problem=str(err))


def _rendezvous_seen() -> str:
    """The rendezvous as this process reached it; for env://, the address torchrun or srun gave."""
    rendezvous = os.environ["RENDEZVOUS"]
    if rendezvous == "env://":
        return f"tcp://{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return rendezvous


@dataclass(frozen=True)
class Party:
    """This process's place in a joined session."""

    name: str
    rank: int
    session: Session


_joined: list[Party] = []


def _set_env(session: Session, *, rank: int, who: str) -> None:
    """Fills CrypTen's environment contract, refusing values that contradict the session."""
    for key, expected in (("RANK", rank), ("WORLD_SIZE", session.world_size)):
        given = os.environ.get(key)
        if given is not None and given != str(expected):
            raise MpcflError(
                f"{who}: environment {key}={given} does not match {session.label} "
                f"({key.lower()} {expected}; {session.world_size} parties plus the dealer)"
            )
        os.environ[key] = str(expected)
    rendezvous = session.rendezvous or os.environ.get("RENDEZVOUS")
    if not rendezvous:
        raise MpcflError(f"{who}: no rendezvous: pass --rendezvous tcp://HOST:PORT or set RENDEZVOUS")
    if not rendezvous.startswith(("tcp://", "file://", "env://")):
        raise MpcflError(f"{who}: rendezvous {rendezvous!r} must start with tcp://, file:// or env://")
    os.environ["RENDEZVOUS"] = rendezvous
    os.environ["DISTRIBUTED_BACKEND"] = "gloo"


def _configure(session: Session) -> Any:
    crypten = import_crypten()
    from crypten.config import cfg

    set_process_group_timeout(session.timeout_s)
    cfg.mpc.provider = "TFP" if session.insecure_dealer else "TTP"
    cfg.communicator.verbose = True
    return crypten


def _translate(err: RuntimeError, who: str, session: Session) -> MpcflError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    rendezvous = os.environ.get("RENDEZVOUS", "the rendezvous")
    if "EADDRINUSE" in str(err) or "address already in use" in str(err):
        return MpcflError(f"{who}: cannot host the rendezvous {rendezvous}: the port is already in use; pick another port")
    if "while trying to connect to" in str(err):
        return MpcflError(
            f"{who}: cannot reach the rendezvous {rendezvous} within timeout_s={session.timeout_s:g}s: "
            f"is rank 0 ({session.parties[0]}) running there, and can this host reach it?"
        )
    if any(marker in str(err) for marker in _PEER_FAILURES):
        return PeerFailure(
            f"{who}: lost a peer of {session.label} (it died, hung past "
            f"timeout_s={session.timeout_s:g}s, or the link was cut): {text}"
        )
    return MpcflError(f"{who}: {text}")


@contextlib.contextmanager
def _crypten_session(crypten: Any, session: Session, who: str) -> Iterator[None]:
    """Turns gloo's errors into one-line ones and always leaves the process group.

    A process that exits without ``crypten.uninit()`` can abort in gloo's threads.
    """
    try:
        yield
    except RuntimeError as err:
        raise _translate(err, who, session) from err
    finally:
        if crypten.is_initialized():
            with contextlib.suppress(RuntimeError):
                crypten.uninit()


@contextlib.contextmanager
def party_session(session: Session, party: str) -> Iterator[int]:
    """Joins the session's process group as ``party`` and yields its rank.

    Raises:
        MpcflError: the environment contradicts the session.
        PeerFailure: a peer failed while the session was open.
    """
    rank = session.rank_of(party)
    who = f"party {party}"
    _set_env(session, rank=rank, who=who)
    crypten = _configure(session)
    if session.insecure_dealer:
        log.warning(
            "INSECURE: the insecure dealer is on, so party %s generates every Beaver "
            "triple and can see all secrets. Use only for tests.", session.parties[0]
        )
    if session.device == "cuda" and not torch.cuda.is_available():
        raise MpcflError(f"{who}: device is cuda but torch sees no GPU")
    with _crypten_session(crypten, session, who):
        init_crypten(crypten, lambda: session.authenticate(crypten, rank))
        log.info("joined %s as rank %d of %d", session.label, rank, session.world_size)
        _joined.append(Party(name=party, rank=rank, session=session))
        try:
            yield rank
        finally:
            _joined.pop()


def run_dealer(session: Session) -> None:
    """Serves Beaver triples to the parties until party 0 ends the session.

    Raises:
        MpcflError: the session runs without a dealer, or the environment contradicts it.
    """
    who = "dealer"
    if session.insecure_dealer:
        raise MpcflError(f"{who}: {session.label} uses the insecure dealer, so it runs without a dealer process")
    _set_env(session, rank=session.world_size, who=who)
    crypten = _configure(session)
    with _crypten_session(crypten, session, who):
        init_crypten(crypten, lambda: session.authenticate(crypten, session.world_size))
        run_dealer_server(crypten)  # returns when party 0 sends "terminate"
    log.info("dealer finished")


def all_gather_public(values: list[int]) -> list[list[int]]:
    """Exchanges small public integers (shapes, status flags) among the parties.

    Tensors, not pickles, so a peer cannot make us unpickle arbitrary objects.
    """
    comm = import_crypten().comm.get()
    gathered = comm.all_gather(torch.tensor(values, dtype=torch.long))
    return [t.tolist() for t in gathered]


def agreed(stage: str, parties: Sequence[str], action: Callable[[], T]) -> T:
    """Runs a local step that every party must finish; if one fails, all stop.

    Without this, a party that fails alone leaves the others waiting for it
    until the timeout.

    Raises:
        MpcflError: this party's own error from ``action``.
        PeerFailure: another party failed (its own process reports why).
    """
    error: MpcflError | None = None
    result: Any = None
    try:
        result = action()
    except MpcflError as err:
        error = err
    flags = all_gather_public([int(error is None)])
    if error is not None:
        raise error
    failed = [parties[r] for r, (flag,) in enumerate(flags) if not flag]
    if failed:
        raise PeerFailure(f"party {', '.join(failed)} failed during {stage}; see its log")
    return result


def communication_stats() -> dict[str, float]:
    """This process's communication so far: rounds, bytes sent, seconds in comms."""
    stats = import_crypten().comm.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]), "comm_time_s": float(stats["time"])}


@contextlib.contextmanager
def join(session: Session | None = None, *, party: str | None = None) -> Iterator[Party]:
    """Joins a secure session as one party, for party scripts.

    With no arguments it reads the role ``mpcfl launch`` put in the environment.

    Args:
        session: the parties and how to reach them; default ``Session.from_env()``.
        party: this process's party name; default ``$MPCFL_PARTY``.

    Raises:
        MpcflError: no role is given or found, or the environment contradicts it.
        PeerFailure: a peer failed while the session was open.
    """
    session = session or Session.from_env()
    party = party or os.environ.get(ENV_PARTY)
    if not party:
        raise MpcflError(f"{ENV_PARTY} is not set: pass party= or start the script with `mpcfl launch`")
    with party_session(session, party):
        yield current_party()


def current_party() -> Party:
    """The party this process joined as.

    Raises:
        MpcflError: called outside :func:`join` (or a job's party process).
    """
    if not _joined:
        raise MpcflError("not inside a secure session: use `with mpcfl.join():` in a script started by `mpcfl launch`")
    return _joined[-1]
