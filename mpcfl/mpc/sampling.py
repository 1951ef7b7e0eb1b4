"""Secret Poisson sampling: each row's inclusion bit drawn jointly under MPC, never opened.

Each party draws a uniform ring element per row from its own AES-CTR generator (a fresh key
known only to it) and takes it as its arithmetic share: the sum r is uniform on Z_2^64 as long
as one party's draw is, so no party, and not the dealer (which only serves triples whose sizes
depend on the row count), knows r. Read as a signed 64-bit integer, r is below a public
threshold t with probability (t + 2^63) / 2^64, which :func:`threshold` sets to q (or just
under it). The comparison never wraps:

- t < 0 (q < 1/2): [r < t] = msb(r) AND msb(r - t). For r >= 0 both sides are 0. For r < 0,
  r - t = r + |t| lies in [-2^63 + 1, 2^63 - 1], so its sign is exactly [r < t].
- t >= 0: [r < t] = msb(r) OR msb(r - t). For r < 0 it is 1. For r >= 0, r - t lies in
  [-t, 2^63 - 1 - t], no wrap, so its sign is exactly [r < t].

Both signs come from one exact comparison with zero (``_ltz``: the sign bit of the shares'
sum, exact for any ring element), and the AND from one Beaver multiplication of 0/1 values
at scale 1 (no truncation, so exact). What is opened on the way is what those protocols open:
values masked by fresh dealer randomness. The bits stay secret-shared; their sum (the batch
size) is never computed in the clear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.prng import SecureGenerator

_HALF_RING = 1 << 63


@dataclass(frozen=True)
class Selection:
    """One step's secret sample: a 0/1 column of inclusion bits (scale 1, so multiplying a
    fixed-point value by it needs no truncation) and the public expected batch size q n."""

    bits: Any  # MPCTensor (rows x 1)
    expected: float


def threshold(probability: float) -> int:
    """t with P(r < t) = floor(q 2^64) / 2^64 <= q for r uniform on the signed 64-bit ring
    (never above q: a smaller rate only strengthens the amplification the accountant uses)."""
    if not 0 < probability < 1:
        raise ValueError(f"a sampling probability must be in (0, 1), got {probability}")
    return math.floor(probability * 2.0**64) - _HALF_RING  # q * 2^64 is exact in binary floating point


def inclusion_bits(
    shape: tuple[int, ...], probability: float, *, generator: SecureGenerator, device: torch.device | str | None = None
) -> Any:
    """Secret bits, each 1 with probability ``probability`` independently: an arithmetic MPCTensor
    of 0/1 at scale 1. Every party calls it together, with its own :class:`SecureGenerator`."""
    crypten = import_crypten()
    t = threshold(probability)
    rank = crypten.comm.get().get_rank()
    share = generator.ring(shape, device).reshape(-1)
    # r - t: party 0 subtracts the public t from its share (int64 arithmetic wraps, as the ring does)
    shifted = share - t if rank == 0 else share
    count = share.numel()
    signs = crypten.mpc.MPCTensor.from_shares(torch.cat([share, shifted]), precision=0)._ltz()
    below, shifted_below = signs[:count], signs[count:]
    both = below * shifted_below
    bits = both if t < 0 else below + shifted_below - both
    return bits.reshape(shape)
