"""THE environment contract between a launcher and the processes it starts.

:func:`to_env` is what ``mpcfl launch`` (and the local launcher) put in a child's
environment; :func:`from_env` reads it back into the same :class:`Session`, and
:func:`join` is how a party script uses it. :data:`KEYS` lists every variable, so a
launcher can clear what it inherited before filling them in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from mpcfl.errors import MpcflError
from mpcfl.mpc import providers
from mpcfl.mpc.auth import ENV_SECRET, Credentials, load_secret
from mpcfl.mpc.compat import (
    BACKEND,
    CRYPTEN_ENV,
    DEFAULT_TIMEOUT_S,
    ENV_BACKEND,
    ENV_RANK,
    ENV_RENDEZVOUS,
    ENV_WORLD_SIZE,
)
from mpcfl.mpc.session import Party, Session, current_party, deferred_credentials, party_session

ENV_PARTIES = "MPCFL_PARTIES"
ENV_PARTY = "MPCFL_PARTY"  # unset for the dealer
ENV_TIMEOUT = "MPCFL_TIMEOUT_S"
ENV_PROVIDER = "MPCFL_PROVIDER"
ENV_DEVICE = "MPCFL_DEVICE"
T = TypeVar("T")
#: Every variable of the contract: ours, the job secret, and CrypTen's.
KEYS = (ENV_PARTIES, ENV_PARTY, ENV_TIMEOUT, ENV_PROVIDER, ENV_DEVICE, ENV_SECRET, *CRYPTEN_ENV)


def script_session(
    parties: tuple[str, ...],
    *,
    rendezvous: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    provider: str = providers.DEFAULT,
    device: str = "cpu",
    credentials: Credentials | None = None,
) -> Session:
    """The session of a party script; launcher and script build it here, so both agree on it."""
    names = ",".join(parties)
    return Session(
        parties=parties,
        rendezvous=rendezvous,
        timeout_s=timeout_s,
        provider=providers.get(provider),
        device=device,
        label=f"script session {names}",
        credentials=credentials or Credentials(),
        fingerprint=f"script session {names}",
    )


def to_env(session: Session, process: str) -> dict[str, str]:
    """The environment of ``process`` (a party's name or the dealer's) in ``session``."""
    rank = session.process_names.index(process)
    env = {
        ENV_PARTIES: ",".join(session.parties),
        ENV_TIMEOUT: repr(session.timeout_s),
        ENV_PROVIDER: session.provider.name,
        ENV_DEVICE: session.device,
        ENV_RANK: str(rank),
        ENV_WORLD_SIZE: str(session.world_size),
        ENV_BACKEND: BACKEND,
    }
    if rank < session.world_size:
        env[ENV_PARTY] = process
    if session.rendezvous:
        env[ENV_RENDEZVOUS] = session.rendezvous
    if session.credentials.secret is not None:
        env[ENV_SECRET] = session.credentials.secret.decode()
    return env


def from_env() -> Session:
    """The session :func:`to_env` described in this process's environment.

    Raises:
        MpcflError: the process was not started by ``mpcfl launch``, or a value is malformed.
    """
    names = os.environ.get(ENV_PARTIES)
    if not names:
        raise MpcflError(f"{ENV_PARTIES} is not set: start party scripts with `mpcfl launch`, or pass parties=")
    return script_session(
        tuple(names.split(",")),
        rendezvous=os.environ.get(ENV_RENDEZVOUS),
        timeout_s=_read(ENV_TIMEOUT, float, str(DEFAULT_TIMEOUT_S)),
        provider=_read(ENV_PROVIDER, providers.known, providers.DEFAULT),
        device=os.environ.get(ENV_DEVICE, "cpu"),
        # Loaded now, from this environment; a process without the secret still joins, so peers refuse it at once.
        credentials=deferred_credentials(lambda: Credentials(secret=load_secret(None))),
    )


def _read(key: str, parse: Callable[[str], T], default: str) -> T:
    """``parse($key)``; raises MpcflError naming the key if the value is malformed."""
    try:
        return parse(os.environ.get(key, default))
    except ValueError as err:
        raise MpcflError(f"${key}: {err}") from None


@contextlib.contextmanager
def join(session: Session | None = None, *, party: str | None = None) -> Iterator[Party]:
    """Joins a secure session as one party, for party scripts.

    With no arguments it reads the role ``mpcfl launch`` put in the environment.

    Args:
        session: the parties and how to reach them; default :func:`from_env`.
        party: this process's party name; default ``$MPCFL_PARTY``.

    Raises:
        MpcflError: no role is given or found, or the environment contradicts it.
        PeerFailure: a peer failed while the session was open.
    """
    session = session or from_env()
    party = party or os.environ.get(ENV_PARTY)
    if not party:
        raise MpcflError(f"{ENV_PARTY} is not set: pass party= or start the script with `mpcfl launch`")
    with party_session(session, party):
        yield current_party()
