"""The one way out of MPC: every plaintext value leaves through :func:`reveal`.

It enforces who may see a value (only the ranks the caller names, which the
job's ``outputs`` section decides) and keeps a ledger of what was revealed to
whom, which each party saves with its outputs. No other module calls
``get_plain_text``; ``tests/test_reveal.py`` scans the package for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


class RevealPolicyError(ValueError):
    """A reveal names no receiver, or a rank that is not a party."""


@dataclass(frozen=True)
class RevealRecord:
    """One entry of the reveal ledger: what left MPC, its shape, and who saw it."""

    what: str
    shape: tuple[int, ...]
    to: tuple[int, ...]


_ledger: list[RevealRecord] = []


def reveal(value: Any, *, to: Sequence[int], what: str) -> torch.Tensor | None:
    """Decrypts a secret-shared value for the receiving ranks only.

    Every party must call it at the same point with the same arguments.

    Args:
        value: the ``CrypTensor`` to open.
        to: ranks that receive the plaintext; the others learn nothing.
        what: a description for the ledger and the logs.

    Returns:
        The plaintext on a receiving rank, ``None`` on every other rank.

    Raises:
        RevealPolicyError: ``to`` is empty, repeats a rank, or names a non-party.
    """
    from mpcfl._compat import import_crypten

    comm = import_crypten().comm.get()
    world, me = comm.get_world_size(), comm.get_rank()
    receivers = tuple(sorted(set(to)))
    if not receivers or len(receivers) != len(to) or not all(0 <= r < world for r in receivers):
        raise RevealPolicyError(f"reveal of {what}: invalid receivers {list(to)} for {world} parties")
    _ledger.append(RevealRecord(what=what, shape=tuple(value.size()), to=receivers))
    log.debug("revealing %s %s to ranks %s", what, tuple(value.size()), receivers)
    if len(receivers) == world:
        return value.get_plain_text()
    result = None
    for rank in receivers:
        opened = value.get_plain_text(dst=rank)
        if rank == me:
            result = opened
    return result


def ledger() -> list[dict[str, Any]]:
    """What this process has revealed so far, as JSON-ready records."""
    return [asdict(record) for record in _ledger]
