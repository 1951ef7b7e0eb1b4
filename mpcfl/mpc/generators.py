"""CrypTen's protocol generators, keyed and drawn by mpcfl.

CrypTen keeps four generators per device (``crypten.generators``): ``prev`` and
``next``, shared with the neighbouring parties for pseudo-random zero-sharings
(the masks that hide every input as it is shared), ``local`` (this party's own)
and ``global`` (shared by all). Upstream they are ``torch.Generator`` objects with
64-bit seeds of which the CPU keeps 32. Here every one is a
:class:`~mpcfl.mpc.prng.SecureGenerator` with its own 128-bit key, and CrypTen's
two drawing functions (``common.rng``) are replaced by :func:`ring_element` and
:func:`kbit_tensor`, which refuse anything but a secure generator.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from mpcfl.mpc.prng import KEY_WORDS, SecureGenerator, key_to_words, new_key, words_to_key

RING_SIZE = 2**64


class InsecureGeneratorError(RuntimeError):
    """Something asked the protocol to draw from a generator that is not cryptographic."""


def _every_device(generator: SecureGenerator) -> collections.defaultdict:
    """A ``{device: generator}`` table that answers the same stream for any device."""
    return collections.defaultdict(lambda: generator)


def setup_party_generators(crypten: Any) -> None:
    """Keys CrypTen's generators for this party, in place of ``crypten._setup_prng``.

    Each party sends a fresh key to the next party and receives the previous
    party's; party 0 broadcasts the global key. Keys travel over the process group
    that authentication has already checked.
    """
    comm = crypten.comm.get()
    world, rank = comm.get_world_size(), comm.get_rank()
    next_key = new_key()
    prev_words = torch.zeros(KEY_WORDS, dtype=torch.long)
    if world >= 2:
        sent = comm.isend(key_to_words(next_key), (rank + 1) % world)
        received = comm.irecv(prev_words, src=(rank - 1) % world)
        sent.wait()
        received.wait()
        prev_key = words_to_key(prev_words)
    else:
        prev_key = next_key
    global_key = words_to_key(comm.broadcast(key_to_words(new_key()), 0))
    keys = {"prev": prev_key, "next": next_key, "local": new_key(), "global": global_key}
    for name, key in keys.items():
        crypten.generators[name] = _every_device(SecureGenerator(key))


def _secure(generator: Any, crypten: Any) -> SecureGenerator:
    if generator is None:
        return crypten.generators["local"][torch.device("cpu")]
    if not isinstance(generator, SecureGenerator):
        raise InsecureGeneratorError(
            f"mpcfl: the protocol asked to draw from {type(generator).__name__}; only "
            "SecureGenerator (AES-CTR) may supply masks and triples"
        )
    return generator


def _size(size: Any) -> tuple[int, ...]:
    return (size,) if isinstance(size, int) else tuple(size)


def _on_device(tensor: torch.Tensor, device: Any) -> Any:
    """Moves a host-made tensor to ``device``, wrapped as CrypTen expects CUDA shares."""
    if device is None or torch.device(device).type == "cpu":
        return tensor
    from crypten.cuda import CUDALongTensor

    return CUDALongTensor(tensor.to(device))


def make_drawers(crypten: Any) -> tuple[Any, Any]:
    """The two replacements for ``crypten.common.rng``, bound to ``crypten``'s generators."""

    def ring_element(size: Any, ring_size: int = RING_SIZE, generator: Any = None, **kwargs: Any) -> Any:
        """Uniform ring elements (``generate_random_ring_element``)."""
        if ring_size != RING_SIZE:
            raise ValueError(f"mpcfl draws only in the 2^64 ring, not {ring_size}")
        device = kwargs.get("device")
        return _on_device(_secure(generator, crypten).ring(_size(size)), device)

    def kbit_tensor(size: Any, bitlength: int | None = None, generator: Any = None, **kwargs: Any) -> Any:
        """Uniform k-bit integers (``generate_kbit_random_tensor``)."""
        device = kwargs.get("device")
        return _on_device(_secure(generator, crypten).kbit(_size(size), bitlength or 64), device)

    return ring_element, kbit_tensor
