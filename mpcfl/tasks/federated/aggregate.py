"""Secure aggregation of one round: every party's update is secret-shared and summed under MPC,
and only the average leaves MPC, through :func:`mpcfl.mpc.reveal.reveal`, to every party.

Weighted (no DP): party i shares ``[n_i * update_i, n_i]``; the parties sum the shares and divide
under MPC, so neither a party's update nor its row count, nor the total count, is opened. Fixed
point (16 fractional bits in a signed 64-bit ring) and CrypTen's truncation shape the division:

- with more than two parties, CrypTen truncates a product by a protocol (``beaver.wraps``) that
  assumes the masked value does not wrap the ring: it errs (by about 2^48 units) with probability
  ``|a b| / 2^32`` per entry. Every product here is therefore kept small, whatever N is;
- ``1/N`` itself is too coarse to encode (N = 10^4 is 6.5 units of 2^-16), so the divisor is
  ``y = s/N`` with a public ``s = ceil(sqrt(B))``, ``B >= N`` (parties x ``federated.max_rows``);
- y comes from Newton's iteration for ``1/x``, ``x = N/s``: ``y <- y (2 - x y)`` from ``y = 1/s``
  (``x y = N/B <= 1``), which climbs to s/N from below and never overshoots, so ``x y <= 1`` and
  ``y (2 - x y) <= 2s``;
- the average is ``(sum / s) * y``, a product of magnitude ``|average|``: each party refuses an entry
  beyond :data:`MAX_AVERAGED` (2^12, an error probability below 2^-20 per entry) before sharing.

The price is precision at the extremes: x = N/s and y are encoded to 2^-16, and each truncation with
n parties is off by up to about n units, so the average's absolute error is about
``n 2^-16 (s/N (1 + |average|) + 1 + |average| N/s)``: a few n 2^-16 when N is near s, up to about
n 2^-16 sqrt(B) (1 + |average|) when N is 1 or B.

With DP the weights are public and uniform: each party shares its clipped update, the joint integer
noise is added to the shares of the *sum* just before the reveal (:class:`~mpcfl.mpc.reveal.Privacy`),
and the noisy sum is divided by the public number of parties that took part after it, in plaintext
(post-processing). Dividing under MPC first would truncate, by up to about n units per coordinate on
each of two neighbouring datasets (:func:`mpcfl.dp.rounding.truncation_error`), against a sensitivity
shrunk by the division: the sum's only rounding is the encoding (:func:`mpcfl.dp.rounding.encoded_sum`).
"""

from __future__ import annotations


import torch

from mpcfl.errors import MpcflError
from mpcfl.mpc.division import divisor_scale, scaled_reciprocal
from mpcfl.mpc.reveal import Privacy, reveal
from mpcfl.mpc.session import prefetching, shared_sum


MAX_AVERAGED = 2.0**12  # |entry| of what is averaged; the product's error probability is |entry| / 2^32


def count_bound(parties: int, max_rows: int) -> int:
    """B: a public bound on the rows a round averages over (every party at most ``max_rows``)."""
    return parties * max_rows


def check_update(update: torch.Tensor, *, bound: float, who: str, what: str = "the local update") -> None:
    """Refuses an update (or ``what`` else is to be averaged) that is not finite or beyond ``bound``, before sharing.

    Raises:
        MpcflError: names the party, the round and the offending entry.
    """
    finite = torch.isfinite(update)
    if not finite.all():
        raise MpcflError(f"{who}: {what} has a non-finite entry ({int((~finite).sum())} of {update.numel()}): local training diverged; lower federated.lr")
    peak = float(update.abs().max()) if update.numel() else 0.0
    if peak > bound:
        raise MpcflError(
            f"{who}: {what} reaches {peak:.4g}, beyond {bound:.4g}, the largest entry the secure average "
            f"takes (a product's truncation under MPC errs with probability |entry| / 2^32); lower "
            f"federated.lr or federated.local_epochs, or rescale the data"
        )


def weighted_average(
    update: torch.Tensor, rows: int, *, bound: int, world: int, device: torch.device, what: str, prefetch: bool
) -> torch.Tensor:
    """The row-weighted average of every party's ``update``, opened to every party.

    Args:
        update: this party's flat update, already checked against :data:`MAX_AVERAGED`; zeros if it sits out.
        rows: this party's weight n_i (0 if it sits out); at most ``bound`` summed over the parties.
        bound: B, public.
        prefetch: the job's ``runtime.prefetch``: under the TTP dealer an average's ~20 sequential
            products take their triples from one batch, recorded on the first average of its size.
    """
    local = torch.cat([update.double() * rows, torch.tensor([float(rows)], dtype=torch.float64)])
    with prefetching(("weighted average", local.numel(), bound), enabled=prefetch):
        total = shared_sum(local, world=world, device=device)
        y = scaled_reciprocal(total[-1:], bound)
        average = total[:-1].div(divisor_scale(bound)) * y
        return reveal(average, to=list(range(world)), what=what).double()


def noisy_mean(
    update: torch.Tensor, parties: int, *, privacy: Privacy, world: int, device: torch.device, what: str
) -> torch.Tensor:
    """The plain mean of the ``parties`` contributions (clipped updates; zeros from a party that sits
    out), opened to every party: ``privacy``'s joint noise goes on the sum under MPC, which is then
    divided by ``parties`` in plaintext (see the module docstring)."""
    total = shared_sum(update.double(), world=world, device=device)
    return reveal(total, to=list(range(world)), what=what, privacy=privacy).double() / parties
