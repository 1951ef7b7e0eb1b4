"""Peer authentication: every process proves it knows the job secret before any data is shared.

Right after the process group forms, every party and the dealer run one
challenge-response round over it:

1. each process contributes a fresh 32-byte random nonce, and all nonces are
   exchanged;
2. each process sends HMAC-SHA256(secret, fingerprint | all nonces | its rank);
3. each process checks every other process's tag.

The tag binds the session's fresh nonces (no replay from an earlier run), the
sender's rank (no reflection to another rank) and the job's fingerprint (a
process of another job, even with the same secret, is refused). A process with
the wrong secret is named by everyone else, and nothing has been shared yet.
The secret never crosses the wire. This authenticates peers; it does not
encrypt the gloo links (see the README's security model).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch

from mpcfl.errors import MpcflError, PeerFailure

ENV_SECRET = "MPCFL_JOB_SECRET"
_WORDS = 4  # 32 bytes as int64 words


class AuthenticationError(MpcflError):
    """This process could not prove it knows the job secret to any peer."""


class PeerRejected(PeerFailure):
    """A peer could not prove it knows the job secret, or belongs to another job."""


def load_secret(secret_file: Path | None) -> bytes | None:
    """The job secret from ``secret_file``, else ``$MPCFL_JOB_SECRET``; ``None`` if neither is set.

    Raises:
        MpcflError: the file is missing, unreadable or too short.
    """
    if secret_file is not None:
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as err:
            raise MpcflError(f"runtime.secret_file: cannot read {secret_file}: {err.strerror}") from None
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


def _words(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()


def _bytes(words: torch.Tensor) -> bytes:
    return words.numpy().tobytes()


def _all_gather(words: torch.Tensor, group: object, size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    gathered = [torch.empty_like(words) for _ in range(size)]
    dist.all_gather(gathered, words, group=group)
    return gathered


def tag(secret: bytes, fingerprint: str, nonces: list[bytes], rank: int) -> bytes:
    message = fingerprint.encode() + b"|" + b"".join(nonces) + b"|" + str(rank).encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def authenticate(secret: bytes, *, fingerprint: str, rank: int, names: list[str], group: object) -> None:
    """Runs the challenge-response round with every process of ``group``.

    Args:
        secret: the job secret.
        fingerprint: what identifies the job (the same at every process).
        rank: this process's rank in the group.
        names: the name of each rank in the group (parties, then the dealer).
        group: the torch.distributed group spanning all processes.

    Raises:
        AuthenticationError: no peer accepted this process (its secret is likely wrong).
        PeerRejected: names the peers whose tags did not verify.
    """
    size = len(names)
    nonces = [_bytes(n) for n in _all_gather(_words(secrets.token_bytes(8 * _WORDS)), group, size)]
    tags = [_bytes(t) for t in _all_gather(_words(tag(secret, fingerprint, nonces, rank)), group, size)]
    failed = [
        names[r] for r, received in enumerate(tags)
        if r != rank and not hmac.compare_digest(received, tag(secret, fingerprint, nonces, r))
    ]
    if failed and len(failed) == size - 1 and size > 2:
        raise AuthenticationError(
            f"{names[rank]}: no peer could verify this process: its job secret is wrong, or its job "
            f"file differs from theirs; nothing was shared"
        )
    if failed:
        raise PeerRejected(
            f"{names[rank]}: {', '.join(failed)} failed authentication (wrong job secret, or a process of "
            f"another job); nothing was shared"
        )
