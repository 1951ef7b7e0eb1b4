"""Peer authentication: every process proves who it is before any data is shared.

Right after the process group forms, every party and the dealer run two rounds
over it:

1. each process announces its mode (no credentials, the job secret, or an
   Ed25519 identity) with a fresh 32-byte nonce. Any mismatch is refused at
   once by everyone, naming the process and what it lacks, so a process
   without credentials never leaves the others waiting for the timeout;
2. each process proves itself over the transcript
   ``fingerprint | all nonces | rank | name | all names | rendezvous``, as it
   sees them: with the job secret, an HMAC-SHA256 tag; with identities, an
   Ed25519 signature that every peer checks against the public key the job
   lists for that rank's name.

The transcript binds the session's fresh nonces (no replay), the sender's rank
and name (no reflection to another rank), the job (another job's process is
refused), and what the peers learned from the rendezvous store (the world and
its address), so a stranger writing to the store can delay the start and is
named, but never joins. A secret proves membership only: any holder can
answer for any rank. An identity proves the rank: a party cannot stand in for
another, nor for the dealer. Nothing secret crosses the wire. This
authenticates peers; it does not encrypt the gloo links (see the README).

With no credentials anywhere (a script session started by hand, without
``mpcfl launch``), the round still runs, and a warning says peers are not
authenticated.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpcfl.errors import MpcflError, PeerFailure
from mpcfl.mpc.keys import check_private_file, public_key_text
from mpcfl.mpc.wire import from_words, to_words

log = logging.getLogger(__name__)

ENV_SECRET = "MPCFL_JOB_SECRET"
_NONCE_BYTES = 32


class Mode(enum.IntEnum):
    """How a process proves itself; announced in the first round."""

    NONE = 0
    SECRET = 1
    ED25519 = 2

    @property
    def text(self) -> str:
        return ("no credentials", "the job secret", "an Ed25519 identity")[self]

    @property
    def lacking(self) -> str:
        """What a process needs to take part in a session of this mode."""
        return ("nothing", "the job secret (runtime.secret_file or $MPCFL_JOB_SECRET)", "its private key (--key-file)")[self]


class AuthenticationError(MpcflError):
    """No peer accepted this process: its credentials are missing or wrong."""


class PeerRejected(PeerFailure):
    """A peer could not prove its identity, lacks credentials, or belongs to another job."""


@dataclass(frozen=True)
class Credentials:
    """What this process proves itself with, and what it checks its peers against.

    ``problem`` says why this process has no usable credentials; it still joins the
    first round, so its peers refuse it at once instead of waiting for it.
    """

    secret: bytes | None = field(default=None, repr=False)
    private_key: Ed25519PrivateKey | None = field(default=None, repr=False)
    public_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    problem: str | None = None

    @property
    def mode(self) -> Mode:
        if self.problem is not None:
            return Mode.NONE
        if self.private_key is not None:
            return Mode.ED25519
        return Mode.SECRET if self.secret is not None else Mode.NONE


def load_secret(secret_file: Path | None) -> bytes | None:
    """The job secret from ``secret_file``, else ``$MPCFL_JOB_SECRET``; ``None`` if neither is set.

    Raises:
        MpcflError: the file is missing, open to group or others, unreadable, or too short.
    """
    if secret_file is not None:
        check_private_file(secret_file, "runtime.secret_file")
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as err:
            raise MpcflError(f"runtime.secret_file {secret_file}: cannot read it: {err.strerror}") from None
        where = str(secret_file)
    elif os.environ.get(ENV_SECRET):
        secret, where = os.environ[ENV_SECRET].encode(), f"${ENV_SECRET}"
    else:
        return None
    if len(secret) < 16:
        raise MpcflError(f"{where}: the job secret must be at least 16 bytes (e.g. `openssl rand -hex 32`)")
    return secret


def new_secret() -> str:
    """A fresh random secret, for launchers that start every process themselves."""
    return secrets.token_hex(32)


def transcript(fingerprint: str, nonces: list[bytes], rank: int, names: list[str], rendezvous: str) -> bytes:
    """What a process of ``rank`` proves: the job, the session's nonces, and the world as it sees it."""
    fields = [fingerprint.encode(), b"".join(nonces), str(rank).encode(), names[rank].encode(),
              ",".join(names).encode(), rendezvous.encode()]
    # Length-prefixed, so no two different field lists give the same bytes.
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def tag(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def _exchange(data: bytes, group: object, size: int) -> list[bytes]:
    """All-gathers equal-length byte strings as int64 tensors (no pickles from peers)."""
    import torch
    import torch.distributed as dist

    words = to_words(data)
    gathered = [torch.empty_like(words) for _ in range(size)]
    dist.all_gather(gathered, words, group=group)
    return [from_words(g) for g in gathered]


def _proof(credentials: Credentials, message: bytes) -> bytes:
    if credentials.mode is Mode.ED25519:
        assert credentials.private_key is not None
        return credentials.private_key.sign(message)
    assert credentials.secret is not None
    return tag(credentials.secret, message)


def _verifies(credentials: Credentials, name: str, proof: bytes, message: bytes) -> bool:
    if credentials.mode is Mode.SECRET:
        assert credentials.secret is not None
        return hmac.compare_digest(proof, tag(credentials.secret, message))
    try:
        credentials.public_keys[name].verify(proof, message)
    except InvalidSignature:
        return False
    return True


def _own_key_hint(credentials: Credentials, name: str) -> str:
    """Why peers may reject this process's signature, as far as it can tell locally."""
    assert credentials.private_key is not None
    mine = public_key_text(credentials.private_key.public_key())
    listed = {public_key_text(k): n for n, k in credentials.public_keys.items()}
    if listed.get(mine) == name:
        return "its key is the one the job lists for it, so its job file or rendezvous differs from theirs"
    if mine in listed:
        return f"its private key is {listed[mine]}'s, not {name}'s"
    return f"its private key is not the one the job lists for {name}"


_FAILED = {
    Mode.SECRET: "failed authentication (wrong job secret, or a process of another job)",
    Mode.ED25519: "failed authentication (its signature does not verify against the public key the job lists for it, "
    "or it runs another job or rendezvous)",
}


def _refuse(rank: int, names: list[str], failed: list[str], own: str, theirs: str) -> NoReturn:
    """Raises: this process's own fault when every peer disagrees with it, else names the peers."""
    if len(failed) == len(names) - 1 and len(names) > 2:
        raise AuthenticationError(f"{names[rank]}: {own}; nothing was shared")
    raise PeerRejected(f"{names[rank]}: {', '.join(failed)} {theirs}; nothing was shared")


def authenticate(
    credentials: Credentials, *, fingerprint: str, rank: int, names: list[str], rendezvous: str, group: object
) -> None:
    """Runs both rounds with every process of ``group`` (see the module docstring).

    Args:
        credentials: this process's credentials.
        fingerprint: what identifies the job (the same at every process).
        rank: this process's rank in the group.
        names: the name of each rank in the group (parties, then the dealer).
        rendezvous: the rendezvous address as this process reached it.
        group: the torch.distributed group spanning all processes.

    Raises:
        MpcflError: this process has no usable credentials (``credentials.problem``).
        AuthenticationError: no peer accepted this process.
        PeerRejected: names the peers that lack credentials or failed to prove them.
    """
    size, mode = len(names), credentials.mode
    announced = _exchange(bytes([mode]) * 8 + secrets.token_bytes(_NONCE_BYTES), group, size)
    modes = [Mode(a[0]) if a[0] <= Mode.ED25519 else Mode.NONE for a in announced]  # garbage is no mode
    nonces = [a[8:] for a in announced]
    if credentials.problem is not None:
        raise MpcflError(f"{names[rank]}: {credentials.problem}")
    odd = [r for r in range(size) if r != rank and modes[r] is not mode]
    if odd:
        wanted, kinds = max(modes[r] for r in odd), {modes[r] for r in odd}
        theirs = f"announced {wanted.text}, but this process uses {mode.text}" if len(kinds) == 1 else \
            f"announced other modes than {mode.text}"
        if wanted < mode:
            theirs += f": {'they lack' if len(odd) > 1 else 'it lacks'} {mode.lacking}"
        own = f"this process has {mode.text}, but its peers use {wanted.text}"
        _refuse(rank, names, [names[r] for r in odd], own=own + (f": it needs {wanted.lacking}" if wanted > mode else ""),
                theirs=theirs)
    if mode is Mode.NONE:
        log.warning("no credentials anywhere: peers are not authenticated (set %s, runtime.secret_file or "
                    "runtime.identity)", ENV_SECRET)
        return
    proofs = _exchange(_proof(credentials, transcript(fingerprint, nonces, rank, names, rendezvous)), group, size)
    accepted = [
        r == rank or _verifies(credentials, names[r], proofs[r], transcript(fingerprint, nonces, r, names, rendezvous))
        for r in range(size)
    ]
    # A signature that fails to verify leaves its signer none the wiser (unlike a wrong secret, which
    # fails both ways), so every process shares its verdicts and all stop together, each knowing why.
    verdicts = _exchange(bytes(accepted).ljust(-(-size // 8) * 8, b"\1"), group, size)
    failed = [names[r] for r in range(size) if not accepted[r]]
    rejecters = [names[v] for v in range(size) if not verdicts[v][rank]]
    if failed:
        own = "no peer could verify this process: its job secret is wrong, or its job file differs from theirs"
        _refuse(rank, names, failed, own=own, theirs=_FAILED[mode])
    if rejecters:
        hint = _own_key_hint(credentials, names[rank]) if mode is Mode.ED25519 else "its job file differs from theirs"
        raise AuthenticationError(f"{names[rank]}: {', '.join(rejecters)} could not verify this process: {hint}; nothing was shared")
    others = [names[r] for r in range(size) if not all(verdicts[v][r] for v in range(size))]
    if others:
        raise PeerRejected(f"{names[rank]}: {', '.join(others)} {_FAILED[mode]} at another process; nothing was shared")
    log.info("authenticated all %d peers (%s)", size - 1, mode.text)
