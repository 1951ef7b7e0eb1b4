"""CrypTen's protocol generators, keyed and drawn by mpcfl.

CrypTen keeps four generators per device (``crypten.generators``): ``prev`` and
``next``, shared with the neighbouring parties for pseudo-random zero-sharings
(the masks that hide every input as it is shared), ``local`` (this party's own)
and ``global`` (shared by all). Upstream they are ``torch.Generator`` objects with
64-bit seeds of which the CPU keeps 32. Here every one is a
:class:`~mpcfl.mpc.prng.SecureGenerator` with its own 128-bit key, and CrypTen's
two drawing functions (``common.rng``) are replaced by :func:`ring_element` and
:func:`kbit_tensor`, which refuse anything but a secure generator.

With more than two parties every pair of parties also shares a key (not only neighbours), for
:func:`pairwise_zero_sharing`: a zero-sharing that only all the other parties together could strip
from one party's share, which :func:`mpcfl.mpc.reveal.reveal` adds before every reveal (a protocol's
own openings are of values masked by the dealer's randomness instead).
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from mpcfl.mpc.prng import KEY_WORDS, SecureGenerator, key_to_words, new_key, words_to_key

RING_SIZE = 2**64

# This party's generator shared with each other party, and the sign its draws take in a zero-sharing
# (+ toward higher ranks, - toward lower): keyed per session by setup_party_generators.
_pairwise: list[tuple[SecureGenerator, int]] = []


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
    _pairwise[:] = pair_generators(comm, world, rank) if world > 2 else []


def pair_generators(comm: Any, world: int, rank: int) -> list[tuple[SecureGenerator, int]]:
    """A fresh key with every other party: the lower rank of each pair draws it and sends it up."""
    mine = {peer: new_key() for peer in range(rank + 1, world)}
    theirs = {peer: torch.zeros(KEY_WORDS, dtype=torch.long) for peer in range(rank)}
    works = [comm.isend(key_to_words(key), peer) for peer, key in mine.items()]
    works += [comm.irecv(words, src=peer) for peer, words in theirs.items()]
    for work in works:
        work.wait()
    keys = {**mine, **{peer: words_to_key(words) for peer, words in theirs.items()}}
    return [(SecureGenerator(keys[peer]), 1 if peer > rank else -1) for peer in sorted(keys)]


def pairwise_zero_sharing(size: tuple[int, ...] | torch.Size, *, xor: bool = False,
                          pairs: list[tuple[SecureGenerator, int]] | None = None) -> torch.Tensor:
    """This party's share of a fresh zero-sharing over every pair of parties (host int64).

    Each pair's draw enters both parties' shares, with opposite signs (``xor``: as is), so the
    shares sum (XOR) to zero; a coalition learns nothing of one party's share unless it holds that
    party's key with every other party, i.e. it is every other party. Every party must call it at
    the same point with the same size: the pair streams advance together. ``pairs``: this party's
    generators with each other party and their signs (default: the session's).

    Raises:
        RuntimeError: no pairwise keys (a session of two parties, or generators not set up).
    """
    pairs = _pairwise if pairs is None else pairs
    if not pairs:
        raise RuntimeError("mpcfl: pairwise zero-sharings need a session of three or more parties")
    total = torch.zeros(tuple(size), dtype=torch.int64)
    for generator, sign in pairs:
        draw = generator.ring(tuple(size))
        total = total ^ draw if xor else total + sign * draw
    return total


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
