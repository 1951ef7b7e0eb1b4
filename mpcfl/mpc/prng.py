"""The one source of randomness for the protocol: AES-128 in counter mode, keyed from the OS.

CrypTen 0.4.1 draws share masks, pairwise zero-sharings and the dealer's triples
from ``torch.Generator`` (Mersenne Twister, with only 32 effective bits of seed on
the CPU): a party that searches the seed space against its own view predicts the
other parties' masks. Every such draw goes through :class:`SecureGenerator`
instead (the compat module routes CrypTen's ``common.rng`` here), and the DP
noise shares come from :func:`numpy_generator`.

AES-CTR (randomgen's ``AESCounter``, AES-NI where the CPU has it) is a
cryptographic PRF, so a stream reveals nothing about its key or its other
outputs. Two processes that hold the same key draw the same stream, which is how
the pairwise generators (shared by neighbouring parties) and the dealer's
per-party generators stay in step. Values are made on the host and moved to the
device: one 128-bit key serves every device, so the draw order, not the device,
keeps peers in step.
"""

from __future__ import annotations

import secrets

import numpy as np
import randomgen
import torch

from mpcfl.mpc.wire import from_words, to_words

KEY_BITS = 128
KEY_WORDS = KEY_BITS // 64  # a key travels over gloo as this many int64 words


def new_key() -> int:
    """A fresh 128-bit key from the OS's CSPRNG."""
    return secrets.randbits(KEY_BITS)


def key_to_words(key: int) -> torch.Tensor:
    """``key`` as int64 words, to send to a peer."""
    return to_words(key.to_bytes(KEY_BITS // 8, "little"))


def words_to_key(words: torch.Tensor) -> int:
    """Inverse of :func:`key_to_words`."""
    return int.from_bytes(from_words(words), "little")


class SecureGenerator:
    """A keyed AES-CTR stream of ring elements (signed 64-bit) and k-bit integers.

    Args:
        key: 128-bit key; ``None`` draws a fresh one known only to this process.
    """

    def __init__(self, key: int | None = None) -> None:
        self._bits = randomgen.AESCounter(key=new_key() if key is None else key)

    def _raw(self, size: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(size, dtype=np.int64))
        return self._bits.random_raw(count).view(np.int64).reshape(size)

    def ring(self, size: tuple[int, ...] | torch.Size, device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform elements of Z_{2^64}, as int64, of the given size."""
        return torch.from_numpy(self._raw(tuple(size))).to(device or "cpu")

    def kbit(self, size: tuple[int, ...] | torch.Size, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integers in [0, 2^bits), as int64; ``bits = 64`` is :meth:`ring`."""
        if not 1 <= bits <= 64:
            raise ValueError(f"bits must be in 1..64, got {bits}")
        values = self._raw(tuple(size))
        if bits < 64:
            values &= np.int64((1 << bits) - 1)  # in place: a 0-d array stays an array, not a numpy scalar
        return torch.from_numpy(values).to(device or "cpu")


def numpy_generator() -> np.random.Generator:
    """numpy's Generator over AES-CTR with a fresh key, for distributions (DP noise shares)."""
    return np.random.Generator(randomgen.AESCounter(key=new_key()))
