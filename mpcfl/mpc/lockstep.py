"""Several protocols' rounds in one: each round opens every protocol's masked values together.

CrypTen runs one protocol at a time, so two independent ones (the sign of x and the
squarings of exp(x), in CrypTen's sigmoid) cost the sum of their rounds. Here a protocol
is a generator: it yields a :data:`Step` (this party's shares of the values it opens
this round, and how they combine) and receives the opened values. :func:`run` drives
several in lockstep: each round issues one exchange for all of them, so the rounds are
those of the longest.

What is opened is what CrypTen's own Beaver steps open: ``x ^ a`` and ``y ^ b`` of an
AND, ``x - r`` of a square, ``b ^ r`` of a bit conversion, each masked by a fresh dealer
value; the same requests go to the provider, in an order that depends on public shapes
only (every party drives the same generators in the same order, so prefetching and the
dealer's digests see the same sequence). Where a round's openings all combine the same
way they go out as CrypTen's batched ``all_reduce``; a mixed round (XOR and sum) goes out
as one ``all_gather`` of every party's masked shares, which reveals nothing more: each
party's share of a masked value is itself uniformly masked by its share of the mask.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from typing import Any

import torch

from mpcfl.mpc.compat import loaded_crypten

SUM, XOR = "sum", "xor"
#: This party's shares of the values a protocol opens in one round, and how shares combine.
Step = tuple[list[torch.Tensor], str]
Protocol = Generator[Step, list[torch.Tensor], Any]


def run(protocols: Sequence[Protocol]) -> list[Any]:
    """Each protocol's result, the protocols driven round by round together (one exchange per round)."""
    results: list[Any] = [None] * len(protocols)
    pending: dict[int, Step] = {}
    for index, protocol in enumerate(protocols):
        _advance(protocols, index, None, pending, results)
    while pending:
        order = sorted(pending)
        opened = _open([pending[i] for i in order])
        for index, values in zip(order, opened):
            _advance(protocols, index, values, pending, results)
    return results


def _advance(protocols: Sequence[Protocol], index: int, values: list[torch.Tensor] | None,
             pending: dict[int, Step], results: list[Any]) -> None:
    try:
        pending[index] = protocols[index].send(values)  # type: ignore[arg-type]  # None starts it
    except StopIteration as done:
        pending.pop(index, None)
        results[index] = done.value


def _open(steps: list[Step]) -> list[list[torch.Tensor]]:
    """The values of every step, opened in one exchange."""
    import torch.distributed as dist

    comm = loaded_crypten().comm.get()
    shares = [share for step, _ in steps for share in step]
    kinds = [kind for step, kind in steps for _ in step]
    if len(set(kinds)) == 1:
        op = dist.ReduceOp.BXOR if kinds[0] == XOR else dist.ReduceOp.SUM
        flat = iter(comm.all_reduce(shares, op=op, batched=True))
    else:  # every party's masked shares, combined here
        gathered = torch.stack(comm.all_gather(torch.cat([share.reshape(-1) for share in shares])))
        parts = gathered.split([share.numel() for share in shares], dim=1)
        flat = iter((part.sum(0) if kind == SUM else functools.reduce(torch.bitwise_xor, part)).view(share.shape)
                    for part, kind, share in zip(parts, kinds, shares))
    return [[next(flat) for _ in step] for step, _ in steps]


def _rank() -> int:
    return loaded_crypten().comm.get().get_rank()


def binary_and(x: torch.Tensor, y: torch.Tensor) -> Generator[Step, list[torch.Tensor], torch.Tensor]:
    """This party's XOR share of ``x & y`` from its shares of both: CrypTen's Beaver AND (``beaver.AND``)."""
    provider = loaded_crypten().mpc.get_default_provider()
    a, b, c = provider.generate_binary_triple(x.size(), y.size(), device=x.device)
    epsilon, delta = yield [x ^ a.share, y ^ b.share], XOR
    result = (b.share & epsilon) ^ (a.share & delta) ^ c.share
    return result ^ (epsilon & delta) if _rank() == 0 else result  # the public term, once


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values (1-d) as one bit plane: bit r of word b is ``bits[64 b + r]``."""
    blocks = -(-bits.numel() // 64)
    padded = torch.nn.functional.pad(bits, (0, blocks * 64 - bits.numel())).view(blocks, 64)
    return (padded << torch.arange(64, device=bits.device)).sum(1)  # disjoint bits: the sum is their OR


def unpack_bits(plane: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` 0/1 values of a bit plane (:func:`pack_bits`)."""
    return ((plane.unsqueeze(1) >> torch.arange(64, device=plane.device)) & 1).reshape(-1)[:count]


def bits_to_arithmetic(plane: torch.Tensor, count: int) -> Generator[Step, list[torch.Tensor], torch.Tensor]:
    """This party's arithmetic shares (scale 1) of ``count`` bits from its XOR shares packed in a
    bit plane (:func:`pack_bits`): CrypTen's ``B2A_single_bit``, opening one bit per value (crypten
    opens a word). The dealer's random bits r cover the plane's padding too, so every opened word
    is uniform, a short last one included."""
    provider = loaded_crypten().mpc.get_default_provider()
    r_arithmetic, r_binary = provider.B2A_rng(torch.Size([plane.numel() * 64]), device=plane.device)
    (z,) = yield [plane ^ pack_bits(r_binary.share & 1)], XOR
    z = unpack_bits(z, count)
    share = r_arithmetic.share[:count] * (1 - 2 * z)  # r if the bit equals r, else 1 - r
    return share + z if _rank() == 0 else share


def multiply(x: Any, y: Any) -> Generator[Step, list[torch.Tensor], Any]:
    """``x * y`` for arithmetic MPCTensors (broadcast as torch's ``*``), as CrypTen's Beaver ``mul``
    and its rescaling: a product of two fixed-point factors is truncated once, a factor at scale 1
    (a comparison's bit, an integer built from bits) leaves the other's scale as it is."""
    crypten = loaded_crypten()
    left, right = x._tensor, y._tensor
    a, b, c = crypten.mpc.get_default_provider().generate_additive_triple(left.size(), right.size(), "mul",
                                                                          device=left.device)
    epsilon, delta = yield [left.share - a.share, right.share - b.share], SUM
    share = c.share + epsilon * b.share + a.share * delta
    product = crypten.mpc.primitives.ArithmeticSharedTensor.from_shares(
        share + epsilon * delta if _rank() == 0 else share, precision=0)
    scales = left.encoder.scale, right.encoder.scale
    product.encoder = left.encoder if scales[0] > 1 else right.encoder
    if min(scales) > 1:
        product.div_(product.encoder.scale)  # as crypten's mul (with > 2 parties or a dealer truncation: its own round)
    result = x.shallow_copy()
    result._tensor = product
    return result


def products(pairs: Sequence[tuple[Any, Any]]) -> list[Any]:
    """``x * y`` for each pair, in one round where the shares are CPU tensors and no autograd tape
    records them; elsewhere (CUDA shares, whose ring arithmetic CrypTen keeps in its own tensor
    type, or a product that training differentiates) one CrypTen product each."""
    recording = loaded_crypten().CrypTensor.AUTOGRAD_ENABLED and any(t.requires_grad for pair in pairs for t in pair)
    if not recording and all(isinstance(t._tensor.share, torch.Tensor) and not t._tensor.share.is_cuda
                             for pair in pairs for t in pair):
        return run([multiply(x, y) for x, y in pairs])
    return [x * y for x, y in pairs]


def square(x: Any) -> Generator[Step, list[torch.Tensor], Any]:
    """``x * x`` for an ArithmeticSharedTensor, truncated as CrypTen's ``square`` does (Beaver, then ``div_``)."""
    crypten = loaded_crypten()
    arithmetic = crypten.mpc.primitives.ArithmeticSharedTensor
    r, r2 = crypten.mpc.get_default_provider().square(x.size(), device=x.device)
    (epsilon,) = yield [x.share - r.share], SUM
    share = r2.share + 2 * r.share * epsilon
    result = arithmetic.from_shares(share + epsilon * epsilon if _rank() == 0 else share, precision=0)
    result.div_(x.encoder.scale)  # as crypten's square_, whatever the scale (with > 2 parties: its own round)
    result.encoder = x.encoder
    return result
