"""Secure ``x < 0``: the sign bit from a carry tree on bit-packed shares.

``x`` is the sum of the parties' arithmetic shares in the 64-bit ring. Each share is an XOR
sharing of itself (its party holds it, the others hold 0), so no party shares anything to
start. With more than two parties, rounds of carry-save adders (a Wallace tree, one AND per
round) turn every three summands into two. The sign of the sum of two XOR-shared words
``a + b`` is ``msb(a) ^ msb(b) ^ carry``, the carry into bit 63. The generate bits ``g = a & b`` take one Beaver AND, and the propagate
bits ``p = a ^ b`` are local. The carry is the generate bit of the whole group, reduced
pairwise in six levels: ``(g, p)_hi o (g, p)_lo = (g_hi ^ p_hi & g_lo, p_hi & p_lo)`` (``g``
and ``p`` are never both 1, so ``^`` stands for ``|``). Bit 63 itself is set to
``(g, p) = (0, 1)``, the identity, so the group's generate bit is the carry out of bit 62.

CrypTen's own comparison (``A2B``, then 64-bit Kogge-Stone adders) keeps every element's 64
bit positions in its word through all six levels, although each level halves the positions
still needed. Here each level's live bits are packed densely across elements before the AND,
so the ANDs open about 3 words per element instead of 13: a quarter of the bytes, the same 8
rounds for two parties and fewer for more (crypten adds the P summands pairwise, 7 rounds
per adder level); figures in ``tests/mpc/test_comparison.py``. Packing is local: an XOR
sharing of a word is an XOR sharing of each of its bits.

Every opened value is a Beaver AND's ``x ^ a`` and ``y ^ b`` (fresh dealer masks) or the
final bit's ``b ^ r`` of CrypTen's ``B2A``: uniform, as in CrypTen's own comparison. The
dealer sees only triple sizes, which depend on the element count and party count alone.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from mpcfl.mpc import lockstep
from mpcfl.mpc.compat import loaded_crypten
from mpcfl.mpc.lockstep import Step

WORD = 64  # bits in a share
_SIGN = WORD - 1
_LOW = (1 << _SIGN) - 1  # every bit but the sign
_TOP = -(1 << _SIGN)  # the sign bit alone, as an int64
#: Elements compared in one go: the carry-save ANDs of P parties ask the dealer for about
#: 2 (P / 3) times this many words, which stays far below its limit (``MAX_ELEMENTS``, 2^28).
CHUNK = 1 << 22
# Masks that gather a word's even-position bits into its low half, one halving at a time.
_GATHER = (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x00FF00FF00FF00FF,
           0x0000FFFF0000FFFF, 0x00000000FFFFFFFF)


def _even_bits(words: torch.Tensor) -> torch.Tensor:
    """Each word's bits 0, 2, 4, ... moved to bits 0, 1, 2, ... (the rest zero)."""
    words = words & _GATHER[0]
    for step, mask in enumerate(_GATHER[1:]):
        words = (words | (words >> (1 << step))) & mask
    return words


def _pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """Values of ``width`` live low bits, ``64 // width`` to a word (the last word zero-padded)."""
    per = WORD // width
    values = torch.nn.functional.pad(values, (0, -values.numel() % per))
    shifts = torch.arange(per, device=values.device) * width
    return (values.view(-1, per) << shifts).sum(-1)  # disjoint bits: the sum is their OR


def _unpack(words: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first ``count`` values of ``width`` bits from words packed by :func:`_pack`."""
    shifts = torch.arange(WORD // width, device=words.device) * width
    mask = (1 << width) - 1 if width < WORD else -1  # all 64 bits: -1, as an int64
    return ((words.unsqueeze(-1) >> shifts) & mask).reshape(-1)[:count]


def _and(left: torch.Tensor, right: torch.Tensor, width: int) -> Generator[Step, Any, torch.Tensor]:
    """This party's share of ``left & right``, XOR-shared values of ``width`` bits, in one Beaver AND."""
    packed = yield from lockstep.binary_and(_pack(left, width), _pack(right, width))
    return _unpack(packed, width, left.numel())


def _carry_save(words: list[torch.Tensor]) -> Generator[Step, Any, list[torch.Tensor]]:
    """One AND round in which every three summands become two, their sum bits and their carries.

    A Wallace tree: all of a round's triples share one AND, so P summands take about
    log_1.5(P / 2) rounds, not P - 2.
    """
    n, k = words[0].numel(), len(words) // 3
    a, b, c = (torch.cat(words[i : 3 * k : 3]) for i in range(3))
    sum_ab = a ^ b
    both = yield from _and(torch.cat([a, c]), torch.cat([b, sum_ab]), WORD)  # a & b and c & (a ^ b): never both 1
    carries = (both[: a.numel()] ^ both[a.numel() :]) << 1
    return [*(sum_ab ^ c).split(n), *carries.split(n), *words[3 * k :]]


def sign_bit_share(flat: torch.Tensor, rank: int, parties: int) -> Generator[Step, Any, torch.Tensor]:
    """This party's XOR share of the sign bit of each ``x``, given its arithmetic shares ``flat`` (1-d).

    A :mod:`~mpcfl.mpc.lockstep` protocol; every party runs it on its own shares, in step: the
    carry-save rounds, then 7 ANDs.
    """
    n, zeros = flat.numel(), torch.zeros_like(flat)
    # Party i's share is an XOR sharing of itself: i holds it, every other party holds 0.
    words = [flat if rank == i else zeros for i in range(parties)]
    while len(words) > 2:
        words = yield from _carry_save(words)
    first, second = words
    g = (yield from _and(first, second, WORD)) & _LOW
    p = ((first ^ second) & _LOW) | (_TOP if rank == 0 else 0)  # bit 63: (g, p) = (0, 1)
    width = WORD
    while width > 2:  # (g, p) of groups of 1, 2, 4, 8, 16 bits into groups of twice that
        width //= 2
        p_high = _even_bits(p >> 1)
        both = yield from _and(torch.cat([p_high, p_high]), torch.cat([_even_bits(g), _even_bits(p)]), width)
        g, p = _even_bits(g >> 1) ^ both[:n], both[n:]
    carry = (g >> 1) ^ (yield from _and(p >> 1, g & 1, 1))  # the last level needs the generate bit only
    return (((first ^ second) >> _SIGN) & 1) ^ carry


def applies(x: Any) -> bool:
    """Whether :func:`less_than_zero_steps` serves ``x``: two or more parties, an arithmetic tensor,
    shares on the CPU (on a GPU not yet run); elsewhere CrypTen's own comparison runs."""
    crypten = loaded_crypten()
    share = getattr(x._tensor, "share", None)
    return (crypten.comm.get().get_world_size() >= 2 and isinstance(x._tensor, crypten.mpc.primitives.ArithmeticSharedTensor)
            and isinstance(share, torch.Tensor) and not share.is_cuda)


def less_than_zero_steps(x: Any) -> Generator[Step, Any, Any]:
    """``x < 0`` as an arithmetic MPCTensor of 0/1 (scale 1), as CrypTen's ``_ltz`` returns it, for
    ``x`` that :func:`applies`; a :mod:`~mpcfl.mpc.lockstep` protocol (8 rounds for two parties).

    An empty tensor needs no message and no dealer request (the dealer refuses empty sizes, so
    CrypTen's own would end the session).
    """
    crypten = loaded_crypten()
    comm = crypten.comm.get()
    arithmetic = crypten.mpc.primitives.ArithmeticSharedTensor
    share = x._tensor.share
    parties, rank = comm.get_world_size(), comm.get_rank()
    if share.numel() == 0:
        bits = torch.zeros_like(share)
    else:
        # Pieces keep each dealer request well under its size limit (public sizes: every party splits alike).
        signs = []
        for piece in share.reshape(-1).split(CHUNK // max(1, parties // 3)):
            signs.append((yield from sign_bit_share(piece, rank, parties)))
        bits = yield from lockstep.bit_to_arithmetic(torch.cat(signs).view(share.shape))
    result = x.shallow_copy()
    result._tensor = arithmetic.from_shares(bits, precision=0)
    result.ptype = crypten.mpc.ptype.arithmetic
    result.encoder._scale = 1
    return result


def less_than_zero(x: Any) -> Any | None:
    """``x < 0`` (see :func:`less_than_zero_steps`), or None where CrypTen's own must run."""
    return lockstep.run([less_than_zero_steps(x)])[0] if applies(x) else None
