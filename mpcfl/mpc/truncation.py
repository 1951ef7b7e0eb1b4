"""Exact division of a shared fixed-point value by a public integer, through the dealer.

After a product at scale s^2 every party holds a share of x, and x must be divided by s.
CrypTen 0.4.1 does it two ways:

- two parties divide their own shares (``share // s``, "local"): the shares are uniform ring
  elements, and when they wrap around the ring (probability about |x| / 2^64 per entry, with
  x at scale 2^32: about |ab| / 2^32 for a product ab) the quotient is off by 2^64 / s, a
  garbage value of about 2^48 units. A transformer's millions of products meet that now and then;
- three or more ask the dealer for the wrap count of a random sharing r and open x + r
  toward party 0 (``beaver.truncate``), ignoring the wrap of x + r itself, which errs with
  the same probability.

Here (mode ``dealer``) the dealer deals a *truncation pair*: a uniform ring element r, shares
of ``floor(r / d)`` and of r's top bit m, r read as an unsigned 64-bit number. The parties open
``z = x + r`` to each other, and with ``y = x + 2^62`` (in [0, 2^63) for |x| < 2^62) and
``z' = z + 2^62 = y + r - w 2^64`` (w the carry of y + r) each computes its share of

    floor(z' / d) - floor(r / d) + w floor(2^64 / d) - floor(2^62 / d),

party 0 adding the public terms. The carry is linear in m: w = 1 needs r > 2^64 - y > 2^63
and then z' < y < 2^63, while w = 0 with z' < 2^63 needs r <= z' < 2^63; so
``w = (1 - msb(z')) m``. Each floor is off by less than one, so the result lies strictly within
2 units of x / d, for every x in (-2^62, 2^62), never wrapping. That is one bit short of the ring:
a product's x is at scale 2^32, so it holds products |ab| < 2^30, where the ring holds 2^31.
Beyond it the carry is misread on a fraction of the entries that grows with |x| - 2^62, each then
off by about 2^64 / d (simulated in plaintext: 12% at -(2^62 + 2^60), 23% at 2^62 + 2^61).

Hiding: r is uniform on the ring and used once, so the opened z is uniform whatever x is
(perfect hiding, statistical distance 0; no range slack is needed for it). The dealer deals
randomness only: it never receives z or any share of x. Each division costs one dealer
request (three ring elements per entry: party 0 receives two, the others draw theirs from their
streams) and one opening of z, where local division costs nothing.

Modes (the job's ``runtime.truncation``): ``local`` is CrypTen's own (above); ``dealer`` is this;
``auto`` is ``dealer`` with three or more parties (where CrypTen asks the dealer anyway) and
``local`` with two, because the dealer round costs two parties 1.7x the rounds and bytes of the
digits ViT's inference and 2x those of W1's training (docs/guides/transformers.md,
docs/performance/benchmarks.md). Without a dealer (TFP), CrypTen's own runs.

On a GPU (CrypTen's ``CUDALongTensor`` shares) the pair is dealt and used on the host: the share
crosses to the host and the result back (:mod:`mpcfl.mpc.device`), so every party draws r from
its host stream, as the dealer does for a request without a device, and the opening travels
through host memory as every opening does on gloo. Checked on an H200 by
``tests/tasks/test_cuda.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mpcfl.errors import MpcflError
from mpcfl.mpc.compat import loaded_crypten
from mpcfl.mpc.device import to_device, to_host

log = logging.getLogger(__name__)

MODES = ("auto", "dealer", "local")
#: x must lie in (-OFFSET, OFFSET): y = x + OFFSET is then in [0, 2^63).
OFFSET = 1 << 62
#: The divisors the dealer deals pairs for: the offset divided by more would be zero.
MAX_DIVISOR = OFFSET
_LOW_63 = (1 << 63) - 1

_state = {"mode": "auto"}


def unsigned_floordiv(value: torch.Tensor, divisor: int) -> torch.Tensor:
    """``floor(u / divisor)`` for ring elements read as unsigned 64-bit u (torch has only int64).

    u = 2h + b with h = u >> 1 (a logical shift: non-negative in int64) and b its low bit; with
    h = q d + r, u // d = 2q + (2r + b) // d, where 2r + b < 2d <= 2^63 fits. The result is in
    [0, 2^63) for every divisor in [2, 2^62].

    Raises:
        ValueError: a divisor outside [2, 2^62].
    """
    if not 2 <= divisor <= MAX_DIVISOR:
        raise ValueError(f"unsigned division by {divisor}: the divisor must be in [2, 2^62]")
    half = (value >> 1) & _LOW_63
    low = value & 1
    return 2 * half.div(divisor, rounding_mode="floor") + (2 * half.remainder(divisor) + low).div(divisor, rounding_mode="floor")


def _ring(value: int) -> int:
    """A non-negative integer below 2^64 as the int64 that holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def set_mode(mode: str) -> None:
    """How this process divides shares by public integers from now on (see the module docstring).

    Raises:
        MpcflError: an unknown mode.
    """
    if mode not in MODES:
        raise MpcflError(f"truncation mode {mode!r} (known: {', '.join(MODES)})")
    _state["mode"] = mode


def mode() -> str:
    """The mode :func:`set_mode` set (``auto`` until then)."""
    return _state["mode"]


def applies(x: Any, divisor: Any) -> bool:
    """Whether dividing the ArithmeticSharedTensor ``x`` by ``divisor`` goes through the dealer:
    the mode asks for it, ``divisor`` is an int in [2, 2^62], the tensor is not empty and the provider
    deals pairs."""
    if _state["mode"] == "local" or type(divisor) is not int or not 2 <= divisor <= MAX_DIVISOR:
        return False
    if x.share.numel() == 0:  # nothing to divide; the dealer refuses an empty request
        return False
    crypten = loaded_crypten()
    if _state["mode"] == "auto" and crypten.comm.get().get_world_size() < 3:
        return False
    provider = crypten.mpc.get_default_provider()
    return hasattr(provider, "generate_truncation")


def divide(x: Any, divisor: Any) -> Any | None:
    """``x.div_(divisor)`` by a truncation pair (in place; returns ``x``), or None where
    :func:`applies` says no, for the caller to divide its own way."""
    if isinstance(divisor, float) and divisor.is_integer():  # as crypten's div_ reads it
        divisor = int(divisor)
    if not applies(x, divisor):
        return None
    provider = loaded_crypten().mpc.get_default_provider()
    device = x.device
    own = to_host(x.share) if device.type == "cuda" else x.share
    r, quotient, top = provider.generate_truncation(tuple(x.size()), divisor, device=None)
    # The one opening: z = x + r, a one-time pad of x (r uniform, fresh).
    opened = (type(r).from_shares(own, precision=0) + r).reveal() + OFFSET
    carry_possible = (opened >= 0).long()  # msb(z') = 0
    share = carry_possible * top.share * _ring((1 << 64) // divisor) - quotient.share
    if x.rank == 0:
        share += unsigned_floordiv(opened, divisor) - OFFSET // divisor
    x.share = to_device(share, device) if device.type == "cuda" else share
    return x
