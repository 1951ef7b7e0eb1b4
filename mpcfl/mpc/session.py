"""Party and dealer process set-up: CrypTen's environment, start and stop.

CrypTen reads :data:`~mpcfl.mpc.compat.CRYPTEN_ENV` from the environment. Parties
take ranks 0..n-1 in the order a :class:`Session` lists them; a provider's dealer
is rank n of a process group of n+1. Everything here runs inside one process;
what a launcher passes to it is :mod:`mpcfl.launch.env`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from mpcfl.mpc import providers
from mpcfl.mpc.compat import (
    BACKEND,
    DEFAULT_TIMEOUT_S,
    ENV_BACKEND,
    ENV_RANK,
    ENV_RENDEZVOUS,
    ENV_WORLD_SIZE,
    end_crypten,
    init_crypten,
    set_store_wrapper,
    process_group_timeout,
    run_dealer_server,
    set_process_group_timeout,
)
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.wire import from_words, to_words
from mpcfl.mpc.auth import Credentials, authenticate
from mpcfl.errors import MpcflError, PeerFailure, first_line

if TYPE_CHECKING:  # torch loads where a session runs; the launcher builds sessions without it
    import torch

log = logging.getLogger(__name__)

# Set to "1" by --plain-network: the operator confirms that plain links across hosts run inside a tunnel.
ENV_PLAIN_NETWORK = "MPCFL_PLAIN_NETWORK"

_PEER_FAILURES = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "Timeout", "timeout", "pair closure")
T = TypeVar("T")


@dataclass(frozen=True)
class Session:
    """Who takes part in a computation and how the processes find each other.

    Args:
        parties: party names; a party's rank is its position.
        rendezvous: ``tcp://HOST:PORT`` shared by all processes; ``None`` reads ``$RENDEZVOUS``.
        timeout_s: process-group timeout: a peer silent this long fails the job.
        provider: where the Beaver triples come from; it decides whether a dealer process exists.
        device: ``cpu`` or ``cuda``.
        label: names the job in error messages.
        credentials: what this process proves itself with (see :mod:`mpcfl.mpc.auth`).
        fingerprint: what every process's copy of the job agrees on.
        truncation: how shares are divided by public integers (:mod:`mpcfl.mpc.truncation`'s modes).
    """

    parties: tuple[str, ...]
    rendezvous: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    provider: providers.Provider = field(default_factory=lambda: providers.get(providers.DEFAULT))
    device: str = "cpu"
    label: str = "mpcfl"
    credentials: Credentials = field(default_factory=Credentials)
    fingerprint: str = ""
    channel: str = "auto"  # see channel_mode: "tls" puts every link through this process's relays (mpcfl.mpc.channel)
    truncation: str = "auto"

    def __post_init__(self) -> None:
        # Job files check this too (jobs.schema); party scripts and the fork harness come here only.
        if providers.DEALER in self.parties:
            raise MpcflError(f"{self.label}: party name {providers.DEALER!r} is reserved for the triple dealer's process")

    @property
    def world_size(self) -> int:
        return len(self.parties)

    @property
    def process_names(self) -> list[str]:
        """Names by rank of every process in the group: the parties, then the dealer."""
        return self.provider.processes(self.parties)

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
    rendezvous = os.environ[ENV_RENDEZVOUS]
    if rendezvous == "env://":
        return f"tcp://{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return rendezvous


@dataclass(frozen=True)
class Party:
    """This process's place in a joined session."""

    name: str
    rank: int
    session: Session

    @property
    def device(self) -> torch.device:
        """Where this party's shares live (see :mod:`mpcfl.mpc.device`)."""
        from mpcfl.mpc.device import resolve

        return resolve(self.session.device)


_joined: list[Party] = []


def _set_env(session: Session, *, rank: int, who: str) -> None:
    """Fills CrypTen's environment contract, refusing values that contradict the session."""
    for key, expected in ((ENV_RANK, rank), (ENV_WORLD_SIZE, session.world_size)):
        given = os.environ.get(key)
        if given is not None and given != str(expected):
            raise MpcflError(
                f"{who}: environment {key}={given} does not match {session.label} "
                f"({key.lower()} {expected}; {session.world_size} parties plus the dealer)"
            )
        os.environ[key] = str(expected)
    rendezvous = session.rendezvous or os.environ.get(ENV_RENDEZVOUS)
    if not rendezvous:
        raise MpcflError(f"{who}: no rendezvous: pass --rendezvous tcp://HOST:PORT or set RENDEZVOUS")
    if not rendezvous.startswith(("tcp://", "file://", "env://")):
        raise MpcflError(f"{who}: rendezvous {rendezvous!r} must start with tcp://, file:// or env://")
    os.environ[ENV_RENDEZVOUS] = rendezvous
    os.environ[ENV_BACKEND] = BACKEND


def _configure(session: Session, rank: int) -> Any:
    crypten = import_crypten()
    from crypten.config import cfg

    from mpcfl.mpc import truncation  # imports torch, as crypten has just done

    set_process_group_timeout(session.timeout_s)
    rendezvous = session.rendezvous or os.environ.get(ENV_RENDEZVOUS, "")
    confirmed = os.environ.get(ENV_PLAIN_NETWORK) == "1"
    mode = channel_mode(session, rendezvous, plain_confirmed=confirmed)
    set_store_wrapper(_channel(session, rank, rendezvous) if mode == "tls" else None)
    if mode == "plain" and not confirmed:
        # Unconfirmed plain links stay on this host whatever the rendezvous looks like (a store on a shared
        # file system, a forwarded port): a peer on another host then cannot connect, rather than read them.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if mode == "plain":
        log.info("links are plain TCP (runtime.channel: %s): %s", session.channel,
                 "confirmed with --plain-network" if confirmed else "on this host's loopback only")
    cfg.mpc.provider = session.provider.crypten_name
    cfg.communicator.verbose = True
    truncation.set_mode(session.truncation)
    return crypten


def channel_mode(session: Session, rendezvous: str, *, plain_confirmed: bool) -> str:
    """``tls`` or ``plain``: what the job's ``runtime.channel`` means for a run meeting at ``rendezvous``.

    ``auto`` is plain on loopback (every process on this host) and TLS across hosts. Plain links
    across hosts let the network read every share and key, so they run only when the operator
    confirms them (``--plain-network``: the links are inside a tunnel).

    Raises:
        MpcflError: TLS without this process's identity key, or unconfirmed plain links across hosts.
    """
    local = _loopback(rendezvous)
    mode = session.channel if session.channel != "auto" else ("plain" if local else "tls")
    if mode == "tls" and session.credentials.private_key is None:
        raise MpcflError(
            f"{session.label}: links between hosts are TLS (runtime.channel: {session.channel}), which binds each link "
            "to a process's key: declare runtime.identity (mpcfl keygen) and pass --key-file; or, inside a tunnel, "
            "set runtime.channel: plain and start every process with --plain-network"
        )
    if mode == "plain" and not local and not plain_confirmed:
        raise MpcflError(
            f"{session.label}: runtime.channel: plain across hosts ({rendezvous}) lets the network read and change every "
            "share and key: start every process with --plain-network to confirm the links are inside a tunnel, or use "
            "runtime.channel: tls"
        )
    return mode


def _loopback(rendezvous: str) -> bool:
    """Whether the rendezvous is on this host: a ``file://`` store, or a host every address of which is
    loopback. (Only a hint: with plain links unconfirmed, gloo is bound to loopback anyway.)"""
    import ipaddress
    import socket

    from mpcfl.mpc.channel import rendezvous_address

    address = rendezvous_address(rendezvous)
    if address is None:
        return True
    host = address[0]
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _channel(session: Session, rank: int, rendezvous: str) -> Callable[[Any], Any]:
    """What wraps the rendezvous store so that gloo's links go through TLS relays (:mod:`mpcfl.mpc.channel`)."""
    from mpcfl.mpc import channel

    credentials = session.credentials
    names = session.process_names
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo listens on loopback: only this process's relays reach it

    def wrap(store: Any) -> Any:
        return channel.secured(
            store, rank=rank, names=names, key=credentials.private_key, public_keys=credentials.public_keys,
            fingerprint=session.fingerprint, run=rendezvous, public_host=channel.public_host(rendezvous),
        )

    return wrap


def _translate(err: RuntimeError, who: str, session: Session) -> MpcflError:
    from mpcfl.mpc.channel import ChannelError, first_failure

    text = first_line(err)
    if (failure := first_failure()) is not None:  # gloo saw a reset; a TLS relay saw why
        return ChannelError(f"{who}: channel {failure}")
    rendezvous = os.environ.get(ENV_RENDEZVOUS, "the rendezvous")
    if "EADDRINUSE" in str(err) or "address already in use" in str(err):
        return MpcflError(f"{who}: cannot host the rendezvous {rendezvous}: the port is already in use; pick another port")
    if "while trying to connect to" in str(err):
        return MpcflError(
            f"{who}: cannot reach the rendezvous {rendezvous} within timeout_s={session.timeout_s:g}s: "
            f"is rank 0 ({session.parties[0]}) running there, and can this host reach it?"
        )
    if cause := next((marker for marker in _PEER_FAILURES if marker in str(err)), None):
        # gloo's own text (its source path, the peer's port, a farewell) is for --debug's traceback
        return PeerFailure(
            f"{who}: lost a peer of {session.label} (it died, hung past "
            f"timeout_s={session.timeout_s:g}s, or the link was cut): {cause.lower()}"
        )
    return MpcflError(f"{who}: {text}")


@contextlib.contextmanager
def _crypten_session(crypten: Any, session: Session, who: str) -> Iterator[None]:
    """Turns gloo's errors into one-line ones, says who gave up waiting on a named peer, and
    always leaves the process group.

    A process that exits without ``crypten.uninit()`` can abort in gloo's threads.
    """
    failed = True
    try:
        yield
        failed = False
    except RuntimeError as err:
        raise _translate(err, who, session) from err
    except PeerFailure as err:
        if err.waiting_on is None:
            raise
        raise PeerFailure(f"{who}: {err}", waiting_on=err.waiting_on) from err
    finally:
        with contextlib.suppress(RuntimeError):
            end_crypten(crypten, failed=failed)
        from mpcfl.mpc.channel import close_all

        close_all()  # after a failure too: a later session (a federated re-formation) gets fresh relays


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
    crypten = _configure(session, rank)
    if session.provider.insecure:
        log.warning(session.provider.warning.format(first=session.parties[0]))
    from mpcfl.mpc.device import resolve

    try:
        resolve(session.device)
    except MpcflError as err:
        raise MpcflError(f"{who}: {err}") from None
    with _crypten_session(crypten, session, who):
        init_crypten(crypten, lambda: session.authenticate(crypten, rank))
        log.info("joined %s as rank %d of %d", session.label, rank, session.world_size)
        _joined.append(Party(name=party, rank=rank, session=session))
        try:
            yield rank
        finally:
            _joined.pop()


def run_dealer(session: Session, *, min_parties: int | None = None) -> None:
    """Serves Beaver triples to the parties until party 0 ends the session.

    With ``min_parties`` (a job that lets parties drop out), a lost party does not end the
    dealer: it re-forms the session with the survivors (:func:`reformed`) and serves them.

    Raises:
        MpcflError: the session runs without a dealer, or the environment contradicts it.
    """
    epoch = 0
    while True:
        try:
            _serve(session)
            return
        except PeerFailure:
            if min_parties is None:
                raise
            epoch += 1
            session = reformed(session, providers.DEALER, epoch=epoch, min_parties=min_parties)


def _serve(session: Session) -> None:
    who = "dealer"
    if not session.provider.needs_dealer:
        raise MpcflError(f"{who}: {session.label} uses provider {session.provider.name}, which runs without a dealer process")
    _set_env(session, rank=session.world_size, who=who)
    crypten = _configure(session, session.world_size)
    with _crypten_session(crypten, session, who):
        init_crypten(crypten, lambda: session.authenticate(crypten, session.world_size))
        run_dealer_server(crypten, session.parties)  # returns when party 0 sends "terminate"
    log.info("dealer finished")


_POLL_S = 0.05


def _store_path(session: Session) -> str:
    rendezvous = session.rendezvous or os.environ.get(ENV_RENDEZVOUS, "")
    if not rendezvous.startswith("file://"):
        raise PeerFailure(
            f"{session.label}: a session re-forms without a lost peer only over a file:// rendezvous (the local "
            f"launcher's), not {rendezvous or 'none'}: its host may be the process that died"
        )
    return rendezvous.removeprefix("file://")


def reformed(session: Session, name: str, *, epoch: int, min_parties: int) -> Session:
    """The session of the processes still alive after ``session`` lost a peer, for its ``epoch``-th re-forming.

    Every live process (parties and dealer) marks itself in a folder beside the rendezvous, waits
    until all of ``session``'s processes have, or until 1.5 job timeouts after the first mark (a
    survivor blocked on another notices the loss up to one timeout later), then proposes who it saw;
    the first proposal written wins, for all. The new session keeps the job's credentials and fingerprint, so it authenticates as the
    first did, and meets on a fresh rendezvous, so gloo, the generators and the dealer's keys all
    start afresh; parties keep their relative order, so ranks follow it.

    Raises:
        MpcflError: no file:// rendezvous, this process was left out, the dealer is gone, or fewer
            than ``min_parties`` parties remain (the message names the lost processes).
    """
    base = _store_path(session)
    folder = f"{base}.members.{epoch}"
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with open(os.path.join(folder, f"alive-{name}"), "w"):
        pass
    everyone = session.process_names
    while True:
        marks = {p: os.path.join(folder, f"alive-{p}") for p in everyone}
        present = [p for p, mark in marks.items() if os.path.exists(mark)]
        first = min(os.path.getmtime(marks[p]) for p in present)
        if len(present) == len(everyone) or time.time() > first + 1.5 * session.timeout_s:
            break
        time.sleep(_POLL_S)
    proposal = os.path.join(folder, f"proposal-{name}")
    with open(proposal, "w") as out:
        json.dump(present, out)
    with contextlib.suppress(FileExistsError):
        os.link(proposal, os.path.join(folder, "members"))  # atomic: the first proposal stands
    with open(os.path.join(folder, "members")) as members_file:
        members = json.load(members_file)
    lost = [p for p in everyone if p not in members]
    parties = tuple(p for p in session.parties if p in members)
    why = f"{session.label}: lost {', '.join(lost) or 'no process'}"
    if name not in members:
        raise MpcflError(f"{name}: {why}, and the others re-formed without this process (it was too late)")
    if session.provider.needs_dealer and providers.DEALER not in members:
        raise PeerFailure(f"{name}: {why}: the triple dealer is gone, so the parties cannot go on")
    if len(parties) < min_parties:
        raise PeerFailure(f"{name}: {why}: {len(parties)} parties remain, below federated.min_parties={min_parties}")
    log.warning("%s; going on with %s", why, ", ".join(members))
    for key in (ENV_RANK, ENV_WORLD_SIZE):  # the old session's; the new one sets its own
        os.environ.pop(key, None)
    return dataclasses.replace(session, parties=parties, rendezvous=f"file://{base}.{epoch}")


def shared_sum(local: torch.Tensor, *, world: int, device: Any = None) -> Any:
    """The sum of every party's ``local`` (the same shape at each), secret-shared: each party shares
    its own value and the shares are added, so no party's value is ever opened."""
    crypten = import_crypten()
    total = None
    for src in range(world):  # crypten reads ``local`` at ``src`` only; elsewhere it gives the size
        part = crypten.cryptensor(local, src=src, device=device)
        total = part if total is None else total + part
    return total


def all_gather_public(values: list[int]) -> list[list[int]]:
    """Exchanges small public integers (shapes, status flags) among the parties.

    Tensors, not pickles, so a peer cannot make us unpickle arbitrary objects.
    """
    import torch

    comm = import_crypten().comm.get()
    gathered = comm.all_gather(torch.tensor(values, dtype=torch.long))
    return [t.tolist() for t in gathered]


def _waited(work: Any, patience_s: float) -> None:
    """Waits for a point-to-point operation up to the job's timeout plus ``patience_s``.

    gloo takes a per-operation timeout only for sends and receives (not collectives, and
    not the group's ``set_timeout``), so long waits use these.
    """
    work.wait(process_group_timeout() + datetime.timedelta(seconds=patience_s))


def send_bytes(data: bytes, dst: int, *, patience_s: float = 0.0) -> None:
    """Sends a byte string to party ``dst`` over the job's links (the authenticated process group).

    Its length goes first, then the bytes as int64 words: tensors, never pickles.
    ``patience_s``: how much longer than the job's timeout ``dst`` may take to receive it
    (a peer busy with a known long local step).
    """
    import torch

    comm = import_crypten().comm.get()
    _waited(comm.isend(torch.tensor([len(data)], dtype=torch.long), dst), patience_s)
    if data:
        _waited(comm.isend(to_words(data + bytes(-len(data) % 8)), dst), patience_s)


def recv_bytes(src: int, *, limit: int, what: str, patience_s: float = 0.0) -> bytes:
    """Receives a byte string that party ``src`` sent with :func:`send_bytes`.

    Raises:
        MpcflError: the announced length is beyond ``limit``; refused before allocating it.
    """
    import torch

    comm = import_crypten().comm.get()
    length = torch.zeros(1, dtype=torch.long)
    _waited(comm.irecv(length, src), patience_s)
    size = int(length.item())
    if not 0 <= size <= limit:
        raise MpcflError(f"rank {src} announced a {size}-byte {what}, where at most {limit} bytes are expected")
    if not size:
        return b""
    words = torch.zeros((size + 7) // 8, dtype=torch.long)
    _waited(comm.irecv(words, src), patience_s)
    return from_words(words)[:size]


def quiet_dealer(seconds: float) -> None:
    """Tells the dealer, if the session has one, to expect no request for up to ``seconds``
    beyond the job's timeout, so a long local step of the parties does not read as a hung party 0.
    Every party calls it at the same point with the same value."""
    if import_crypten().mpc.ttp_required():
        from mpcfl.mpc.providers.ttp import announce_quiet

        announce_quiet(math.ceil(seconds))


def prefetching(key: Any, *, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Around a unit of work whose triples repeat for the same ``key`` (a training step by its
    batch size): under the TTP dealer with ``enabled`` (the job's ``runtime.prefetch``), the
    unit's triples come in one batch from the dealer (:func:`mpcfl.mpc.providers.ttp.prefetched`).
    Every party calls it at the same point with the same key."""
    if enabled and import_crypten().mpc.ttp_required():
        from mpcfl.mpc.providers.ttp import prefetched

        return prefetched(key)
    return contextlib.nullcontext()


def agreed(stage: str, parties: Sequence[str], action: Callable[[], T]) -> T:
    """Runs a local step that every party must finish; if one fails, all stop.

    Without this, a party that fails alone leaves the others waiting for it
    until the timeout.

    Raises:
        MpcflError: this party's own error from ``action``.
        PeerFailure: another party failed (its own process reports why).
    """
    return agreed_public(stage, parties, action, lambda _: [], width=0)[0]


def agreed_public(
    stage: str, parties: Sequence[str], action: Callable[[], T], public: Callable[[T], list[int]], *, width: int
) -> tuple[T, list[list[int]]]:
    """:func:`agreed`, and in the same round every party learns each party's ``public(result)``.

    ``public`` gives ``width`` small public integers (a shape, say); a party that failed sends
    zeros. One round instead of an agreement plus an exchange: each round is an RTT on a real link.

    Returns:
        ``action``'s result, and each party's public integers by rank.

    Raises:
        MpcflError: this party's own error from ``action``.
        PeerFailure: another party failed (its own process reports why).
    """
    error: MpcflError | None = None
    result: Any = None
    mine = [0] * width
    try:
        result = action()
        mine = public(result)
    except MpcflError as err:
        error = err
    if len(mine) != width:
        raise ValueError(f"{stage}: {len(mine)} public integers, expected {width}")
    rows = all_gather_public([int(error is None), *mine])
    if error is not None:
        raise error
    failed = [parties[r] for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise PeerFailure(f"party {', '.join(failed)} failed during {stage}; see its log")
    return result, [row[1:] for row in rows]


def communication_stats() -> dict[str, float]:
    """This process's communication so far: rounds, bytes sent, seconds in comms."""
    stats = import_crypten().comm.get().get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]), "comm_time_s": float(stats["time"])}


def current_party() -> Party:
    """The party this process joined as.

    Raises:
        MpcflError: called outside :func:`join` (or a job's party process).
    """
    if not _joined:
        raise MpcflError("not inside a secure session: use `with mpcfl.join():` in a script started by `mpcfl launch`")
    return _joined[-1]


def session_device() -> torch.device:
    """The device this party computes on: every value it shares, and its model, live there.

    Raises:
        MpcflError: called outside a joined session.
    """
    return current_party().device
