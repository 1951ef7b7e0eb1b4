"""CrypTen's sigmoid between two parties in 16 rounds instead of 24: its sign and exp in the same rounds.

CrypTen 0.4.1's sigmoid (``sigmoid_tanh_method: reciprocal``) takes the sign of x (a
comparison, 8 rounds for two parties), multiplies x by it (1), raises ``1 - |x| / 2^k`` to
the ``2^k`` by k squarings (8), inverts ``1 + exp(-|x|)`` by 3 Newton steps (6) and picks
``p`` or ``1 - p`` by the sign (1): 24 rounds, one after another. The squarings need not wait
for the sign: here both ``exp(-x)`` and ``exp(x)`` are raised, stacked, in the comparison's
rounds (:mod:`mpcfl.mpc.lockstep`), and the sign then picks the one that is at most 1,
``exp(-|x|)``, in the round where CrypTen multiplied by it: 16 rounds, the same function.

The other power exceeds the fixed-point range once |x| passes about 32 and wraps the ring;
the pick multiplies it by the exact bit 0 (Beaver products of a 0/1 share of scale 1 are
exact and untruncated), so it drops out exactly, and ``b * (e+ - e-) + e-`` is exactly the
chosen power. Everything opened is a Beaver opening masked by a fresh dealer value, as in
CrypTen's own; the stacked squarings open twice the elements of CrypTen's.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mpcfl.mpc import comparison, lockstep
from mpcfl.mpc.compat import loaded_crypten

#: What CrypTen's sigmoid sets for its reciprocal (crypten/common/functions/approximations.py).
RECIPROCAL = {"functions.exp_iterations": 9, "functions.reciprocal_nr_iters": 3,
              "functions.reciprocal_all_pos": True, "functions.reciprocal_initial": 0.75}


def _powers(base: Any, squarings: int) -> Generator[lockstep.Step, Any, Any]:
    """``base ^ (2 ^ squarings)`` of an MPCTensor, one lockstep round per squaring."""
    for _ in range(squarings):
        base._tensor = yield from lockstep.square(base._tensor)
    return base


def sigmoid(x: Any) -> Any | None:
    """CrypTen's sigmoid of an MPCTensor, or None where CrypTen's own must run (another
    ``sigmoid_tanh_method``, a tensor the packed comparison does not serve, other than two parties, or one of more than
    ``comparison.CHUNK`` elements, whose doubled squarings would ask the dealer too much at once)."""
    crypten = loaded_crypten()
    cfg = crypten.cfg
    if cfg.functions.sigmoid_tanh_method != "reciprocal" or not comparison.applies(x):
        return None
    if crypten.comm.get().get_world_size() != 2:
        # With more parties a mixed round's all_gather moves (P - 1) shares where all_reduce moves
        # about 2, and each squaring's truncation gathers at party 0: W1 at 3-5 parties moved 1.8-2.5x
        # the bytes for 8 fewer of its 48-50 rounds, no faster (measured when openings among 3+ parties
        # still took gloo's ring; not rerun since they are one exchange). CrypTen's own runs there.
        return None
    if x.share.numel() > comparison.CHUNK:  # the stacked squarings' requests would pass the dealer's size cap
        return None
    if x.share.numel() == 0:  # nothing to open; the dealer refuses empty sizes, which would end the session
        return x.clone()
    squarings = cfg.functions.exp_iterations
    # CrypTen's exp(y) = (1 + y / 2^k)^(2^k), here for y = -x and y = x at once.
    base = crypten.stack([x.neg(), x]).div(2**squarings) + 1
    below_zero, powers = lockstep.run([comparison.less_than_zero_steps(x), _powers(base, squarings)])
    exp_minus, exp_plus = powers[0], powers[1]
    denominator = below_zero * (exp_plus - exp_minus) + exp_minus + 1  # 1 + exp(-|x|)
    with cfg.temp_override(RECIPROCAL):
        positive = denominator.reciprocal()  # sigmoid(|x|)
    return positive.where(1 - below_zero, 1 - positive)
