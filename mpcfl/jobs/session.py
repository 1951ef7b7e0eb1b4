"""The session of one of a job's processes: its parties, timeout, device and credentials."""

from __future__ import annotations

from pathlib import Path

from mpcfl.jobs.schema import JobBase
from mpcfl.mpc import providers
from mpcfl.mpc.auth import Credentials, load_secret
from mpcfl.mpc.keys import load_private_key, public_key
from mpcfl.mpc.session import Session, deferred_credentials


def session_of(job: JobBase, *, rendezvous: str | None = None, key_file: Path | None = None) -> Session:
    """The session of one of the job's processes; ``key_file`` is its private key for ``runtime.identity``."""
    return Session(
        parties=tuple(job.party_names),
        rendezvous=rendezvous,
        timeout_s=job.runtime.timeout_s,
        provider=providers.get(job.runtime.provider),
        device=job.runtime.device,
        label=f"job {job.name} ({job.source})",
        credentials=_credentials(job, key_file),
        fingerprint=job.fingerprint(),
        channel=job.runtime.channel,
        truncation=job.runtime.truncation,
    )


def _credentials(job: JobBase, key_file: Path | None) -> Credentials:
    """An identity job's key pair list and this process's private key; else the job secret."""
    identity = job.runtime.identity
    if identity is None:
        return deferred_credentials(lambda: Credentials(secret=load_secret(job.runtime.secret_file)))
    if key_file is None:
        return Credentials(problem=f"{job.source}: runtime.identity is set: pass this process's private key with --key-file")
    public_keys = {name: public_key(text) for name, text in identity.public_keys.items()}
    return deferred_credentials(lambda: Credentials(private_key=load_private_key(key_file), public_keys=public_keys))
