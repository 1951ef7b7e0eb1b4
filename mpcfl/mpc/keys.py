"""Ed25519 identity keys and private credential files.

A private key is an unencrypted PKCS#8 PEM file readable by its owner only; a
public key is its raw 32 bytes in base64, one line, so it can be pasted into a
job file. PEM public keys (``openssl pkey -pubout``) are accepted too. This
module imports no torch, so the job schema can validate keys cheaply.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpcfl.errors import MpcflError

log = logging.getLogger(__name__)

_RAW_KEY_BYTES = 32


def check_private_file(path: Path, what: str) -> None:
    """Refuses a credential file others may read, as ssh does with private keys.

    Raises:
        MpcflError: the file is missing, or group or others have any access to it.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as err:
        raise MpcflError(f"{what} {path}: {err.strerror}") from None
    if mode & 0o077:
        raise MpcflError(f"{what} {path} is accessible by group or others (mode {mode:04o}): run `chmod 600 {path}`")


def _raw_key(text: str) -> bytes | None:
    """The 32 bytes a base64 public key encodes, or None if ``text`` is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == _RAW_KEY_BYTES else None


def is_raw_key(value: str) -> bool:
    """Whether a job file's value is a key itself rather than a path to one."""
    return _raw_key(value) is not None


def public_key_text(key: Ed25519PublicKey) -> str:
    """The one-line base64 form of a public key."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def read_public_key(value: str) -> str:
    """A public key given as base64 raw bytes or as a path to a .pub or PEM file, in base64 form.

    Raises:
        ValueError: the value is neither a key nor a readable key file.
    """
    if is_raw_key(value):
        return value.strip()
    try:
        text = Path(value).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read public key file {value}: {getattr(err, 'strerror', None) or err}") from None
    if is_raw_key(text):
        return text.strip()
    try:
        key = serialization.load_pem_public_key(text.encode())
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{value}: not an Ed25519 public key (base64 of 32 bytes, or PEM)")
    return public_key_text(key)


def public_key(text: str) -> Ed25519PublicKey:
    """The key object for a validated base64 public key."""
    raw = _raw_key(text)
    assert raw is not None, "public keys are validated when the job is loaded"
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """This process's private key, from a file only its owner can read.

    Raises:
        MpcflError: the file is missing, open to others, or not an unencrypted Ed25519 PEM key.
    """
    check_private_file(path, "private key file")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise MpcflError(f"private key file {path}: not an unencrypted Ed25519 PEM key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MpcflError(f"private key file {path}: holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates ``path`` with ``mode`` from the start (never briefly wider), refusing to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise MpcflError(f"{path} already exists; remove it or pick another --out") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def generate(name: str, out: Path) -> tuple[Path, Path]:
    """Writes ``out/NAME.key`` (private, mode 0600) and ``out/NAME.pub`` (base64 public key).

    Returns:
        The private and public key paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    _write_new(key_path, private, 0o600)
    _write_new(pub_path, (public_key_text(key.public_key()) + "\n").encode(), 0o644)
    return key_path, pub_path
