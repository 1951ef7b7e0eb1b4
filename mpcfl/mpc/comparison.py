"""Secure ``x < 0``: the sign bit from a carry tree on bit-sliced shares.

``x`` is the sum of the parties' arithmetic shares in the 64-bit ring. Each share is an XOR
sharing of itself (its party holds it, the others hold 0), so no party shares anything to
start. A party first transposes its share into bit planes: plane ``j`` holds bit ``j`` of 64
elements per word (a 64 x 64 bit-matrix transpose per 64 elements, six swap steps; an XOR
sharing of the words is one of the planes, as the transpose is linear). With more than two
parties, rounds of carry-save adders (a Wallace tree, one AND per round) turn every three
summands into two. The sign of the sum of two XOR-shared words ``a + b`` is ``msb(a) ^ msb(b) ^
carry``, the carry into the top bit. The generate bits ``g = a & b`` take one Beaver AND, the
propagate bits ``p = a ^ b`` are local, and the carry is the generate bit of the whole group of
lower positions, reduced pairwise: ``(g, p)_hi o (g, p)_lo = (g_hi ^ p_hi & g_lo, p_hi & p_lo)``
(``g`` and ``p`` are never both 1, so ``^`` stands for ``|``). On planes a level's pairs are
every other plane, so every AND is over dense words with no gathering of bits, and the lowest
group's propagate bit is never computed (no carry enters below bit 0).

CrypTen's own comparison (``A2B``, then 64-bit Kogge-Stone adders) keeps every element's 64 bit
positions in its word through all six levels, although each level halves the positions still
needed. Here the ANDs open about 5.7 words per element where crypten's open 13, in the same 8
rounds for two parties (fewer for more parties: crypten adds the P summands pairwise, 7 rounds
per adder level), and the final bit conversion opens one bit per element, not a word; figures in
``tests/mpc/test_comparison.py``.

:func:`bounded` narrows the comparison to the inputs' low bits where a caller knows their
encodings are small: the sign of ``x`` is bit ``k - 1`` of ``x mod 2^k`` while ``|x| < 2^(k-1)``,
and the low ``k`` bits of the shares add up to ``x mod 2^k``. GELU's and SiLU's inputs (a linear
layer's output) come out of fixed-point products, which hold only below 2^30 (encodings below
2^46), so 48 bits decide them exactly, with about three quarters of the bytes (GELU's three comparisons at 128 x 3072,
two parties: 108 MB where 143 MB).

Every opened value is a Beaver AND's ``x ^ a`` and ``y ^ b`` (fresh dealer masks) or the final
bit's ``b ^ r`` of CrypTen's ``B2A``: uniform, as in CrypTen's own comparison. The dealer sees
only triple sizes, which depend on the element count, the width and the party count alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from contextvars import ContextVar
from typing import Any

import torch

from mpcfl.mpc import lockstep
from mpcfl.mpc.compat import loaded_crypten
from mpcfl.mpc.lockstep import Step

WORD = 64  # bits in a share
#: Elements compared in one go (a multiple of 64): the carry-save ANDs of P parties ask the dealer
#: for about 2 (P / 3) times this many words, far below its limit (``MAX_ELEMENTS``, 2^28).
CHUNK = 1 << 22
#: Each swap step of the bit-matrix transpose: its span j, and the low half of every group of 2j
#: bits (never the top bit, so the masks are positive int64 values).
_SWAPS = [(j, sum(((1 << j) - 1) << s for s in range(0, WORD, 2 * j))) for j in (32, 16, 8, 4, 2, 1)]
_width: ContextVar[int] = ContextVar("mpcfl_comparison_width", default=WORD)


@contextlib.contextmanager
def bounded(bits: int) -> Iterator[None]:
    """Comparisons in the block decide from their inputs' low ``bits`` bits: exact while every
    input's fixed-point encoding is below 2^(bits - 1) in magnitude, garbage beyond. For callers
    whose inputs come out of products (below 2^30, encodings below 2^46): 48 bits."""
    if not 2 <= bits <= WORD:
        raise ValueError(f"a comparison takes 2 to {WORD} bits, not {bits}")
    token = _width.set(bits)
    try:
        yield
    finally:
        _width.reset(token)


def _planes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The low ``bits`` bit planes of 1-d ``words``, shape ``(bits, ceil(n / 64))``: bit r of plane
    j's word b is bit j of ``words[64 b + r]`` (the last block zero-padded)."""
    blocks = -(-words.numel() // WORD)
    matrix = words.new_zeros(blocks * WORD)  # a buffer of its own: the swaps below work in place
    matrix[: words.numel()] = words
    matrix = matrix.view(blocks, WORD)
    for span, mask in _SWAPS:  # swap the off-diagonal span x span blocks of each 2 span x 2 span block
        pairs = matrix.view(blocks, WORD // (2 * span), 2, span)
        low, high = pairs[:, :, 0], pairs[:, :, 1]
        swapped = ((low >> span) ^ high) & mask
        high ^= swapped
        low ^= swapped << span
    return matrix.t()[:bits].contiguous()


def _and(left: torch.Tensor, right: torch.Tensor) -> Generator[Step, Any, torch.Tensor]:
    """This party's share of ``left & right`` (XOR-shared planes of the same shape), in one Beaver AND."""
    both = yield from lockstep.binary_and(left.reshape(-1), right.reshape(-1))
    return both.view(left.shape)


def _carry_save(summands: list[torch.Tensor]) -> Generator[Step, Any, list[torch.Tensor]]:
    """One AND round in which every three summands (plane stacks) become two, their sum bits and
    their carries, each carry moved up a plane (the top plane's carry leaves the ring).

    A Wallace tree: all of a round's triples share one AND, so P summands take about
    log_1.5(P / 2) rounds, not P - 2.
    """
    k = len(summands) // 3
    a, b, c = (torch.stack(summands[i : 3 * k : 3]) for i in range(3))
    sum_ab = a ^ b
    both = yield from _and(torch.cat([a, c])[:, :-1], torch.cat([b, sum_ab])[:, :-1])  # never both 1
    carries = torch.nn.functional.pad(both[:k] ^ both[k:], (0, 0, 1, 0))  # plane j's carry goes to plane j + 1
    return [*(sum_ab ^ c).unbind(), *carries.unbind(), *summands[3 * k :]]


def _group_generate(g: torch.Tensor, p: torch.Tensor) -> Generator[Step, Any, torch.Tensor]:
    """The generate bit of all positions together (the carry out of the top one), from the planes
    of each position's generate and propagate bits, lowest first: pairs combined in each AND,
    an odd top position carried up as it is."""
    while g.size(0) > 1:
        half = g.size(0) // 2
        high_g, low_g = g[1 : 2 * half : 2], g[0 : 2 * half : 2]
        high_p, low_p = p[1 : 2 * half : 2], p[0 : 2 * half : 2]
        # The lowest group's propagate bit is never needed (no carry enters below bit 0): not computed.
        both = yield from _and(torch.cat([high_p, high_p[1:]]), torch.cat([low_g, low_p[1:]]))
        next_g, next_p = high_g ^ both[:half], torch.cat([torch.zeros_like(both[:1]), both[half:]])
        g, p = torch.cat([next_g, g[2 * half :]]), torch.cat([next_p, p[2 * half :]])
    return g[0]


def sign_bit_share(flat: torch.Tensor, rank: int, parties: int, bits: int = WORD) -> Generator[Step, Any, torch.Tensor]:
    """This party's XOR share of the sign bit of each ``x``, as a bit plane (:func:`unpack_bits`),
    given its arithmetic shares ``flat`` (1-d), from their low ``bits`` bits (:func:`bounded`).

    A :mod:`~mpcfl.mpc.lockstep` protocol; every party runs it on its own shares, in step: the
    carry-save rounds, then the generate bits' AND and one AND a level.
    """
    own = _planes(flat, bits)
    zeros = torch.zeros_like(own)
    # Party i's share is an XOR sharing of itself: i holds it, every other party holds 0.
    summands = [own if rank == i else zeros for i in range(parties)]
    while len(summands) > 2:
        summands = yield from _carry_save(summands)
    first, second = summands
    g = yield from _and(first[:-1], second[:-1])
    carry = yield from _group_generate(g, first[:-1] ^ second[:-1])
    return first[-1] ^ second[-1] ^ carry


def applies(x: Any) -> bool:
    """Whether :func:`less_than_zero_steps` serves ``x``: two or more parties, an arithmetic tensor,
    shares on the CPU (on a GPU not yet run); elsewhere CrypTen's own comparison runs."""
    crypten = loaded_crypten()
    share = getattr(x._tensor, "share", None)
    return (crypten.comm.get().get_world_size() >= 2 and isinstance(x._tensor, crypten.mpc.primitives.ArithmeticSharedTensor)
            and isinstance(share, torch.Tensor) and not share.is_cuda)


def less_than_zero_steps(x: Any) -> Generator[Step, Any, Any]:
    """``x < 0`` as an arithmetic MPCTensor of 0/1 (scale 1), as CrypTen's ``_ltz`` returns it, for
    ``x`` that :func:`applies`; a :mod:`~mpcfl.mpc.lockstep` protocol (8 rounds for two parties),
    on the width :func:`bounded` sets (all 64 bits by default).

    An empty tensor needs no message and no dealer request (the dealer refuses empty sizes, so
    CrypTen's own would end the session).
    """
    crypten = loaded_crypten()
    comm = crypten.comm.get()
    arithmetic = crypten.mpc.primitives.ArithmeticSharedTensor
    share = x._tensor.share
    parties, rank, bits = comm.get_world_size(), comm.get_rank(), _width.get()
    if share.numel() == 0:
        result_share = torch.zeros_like(share)
    else:
        # Pieces keep each dealer request well under its size limit (public sizes: every party splits
        # alike), each a whole number of 64-element blocks, so their planes join into one.
        piece = max(WORD, CHUNK // max(1, parties // 3) // WORD * WORD)
        signs = []
        for part in share.reshape(-1).split(piece):
            signs.append((yield from sign_bit_share(part, rank, parties, bits)))
        result_share = yield from lockstep.bits_to_arithmetic(torch.cat(signs), share.numel())
        result_share = result_share.view(share.shape)
    result = x.shallow_copy()
    result._tensor = arithmetic.from_shares(result_share, precision=0)
    result.ptype = crypten.mpc.ptype.arithmetic
    result.encoder._scale = 1
    return result


def less_than_zero(x: Any) -> Any | None:
    """``x < 0`` (see :func:`less_than_zero_steps`), or None where CrypTen's own must run."""
    return lockstep.run([less_than_zero_steps(x)])[0] if applies(x) else None
