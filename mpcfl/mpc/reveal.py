"""The one way out of MPC: every plaintext value leaves through :func:`reveal`.

It enforces who may see a value (only the ranks the caller names, which the
job's ``outputs`` section decides), applies the DP layer, and records what was
revealed to whom in the run's :class:`Disclosure`, which each party saves with its
outputs. No other module calls ``get_plain_text``; ``tests/mpc/test_reveal.py`` scans
the package for it.

A task opens one :class:`Disclosure` per run (``with Disclosure(budget) as d:``):
nothing of it outlives the ``with``, so two runs in one process never share a
ledger or a budget. A reveal outside any disclosure (a party script, a test) is
neither recorded nor budgeted. When the disclosure has a privacy budget (a job
with ``dp``), every reveal must say what it costs: the charge is checked against the budget first, and a reveal that
would exceed it is refused before anything is opened. If the reveal itself adds
noise (output perturbation), each party adds its integer noise share to its own
arithmetic share just before opening. Noisy computation that later reveals depend
on (DP-SGD's steps) is charged by :func:`spend` as it completes, so the ledger
bounds every release, including one that is only post-processing of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar, Token
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import torch

from mpcfl.dp.accountant import Charge
from mpcfl.dp.budget import Budget
from mpcfl.errors import MpcflError
from mpcfl.runs import Journal, Opening

log = logging.getLogger(__name__)


class RevealPolicyError(MpcflError):
    """A reveal names no receiver or a non-party, or skips the privacy budget."""


@dataclass(frozen=True)
class Privacy:
    """What a reveal costs, and the noise (if any) it adds before opening.

    Args:
        charge: the mechanism charged to the budget for this reveal; its
            ``mechanism`` also picks the noise (``gaussian`` or ``laplace``). None: the
            value is post-processing of computation already charged by :func:`spend`.
        scale: the noise to add now, in the value's units (standard deviation, or
            Laplace b); 0 when the noise went in earlier (DP-SGD steps).
        colluders: t, parties that may pool their noise shares; the shares are
            sized so the other n - t parties' noise alone reaches ``scale``.
        source: who draws the noise (see :func:`add_noise`).
    """

    charge: Charge | None
    scale: float = 0.0
    colluders: int = 0
    source: str = "parties"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):  # NaN > 0 is false: it would open with no noise
            raise ValueError(f"noise scale must be finite and non-negative, got {self.scale}")
        if self.charge is None and self.scale > 0:
            raise ValueError("noise added at a reveal is a mechanism: it needs a charge")


@dataclass(frozen=True)
class RevealRecord:
    """One entry of the reveal ledger: what left MPC, its shape, and who saw it."""

    what: str
    shape: tuple[int, ...]
    to: tuple[int, ...]
    epsilon_after: float | None = None
    outside_dp: bool = False  # disclosed by a protocol before MPC (PSI), not covered by the DP guarantee


class Disclosure:
    """One run's record of what left MPC, and the privacy budget (if any) every reveal is charged to.

    While entered, every :func:`reveal` records into it and charges its budget; leaving
    it, by return or exception, removes both from the reveal path. With a ``journal`` (a job's
    run, :mod:`mpcfl.runs`), every opening is first written to it durably, with its receivers,
    its contributors and the run's ``inputs`` commitment, and refused if it would reopen a step
    with other contributors, receivers or inputs; a journal with ``check`` set (a resumed run)
    makes every party check together, so all stop at once.
    """

    def __init__(self, budget: Budget | None = None, *, journal: Journal | None = None, inputs: str = "") -> None:
        self.budget = budget
        self.journal, self.inputs = journal, inputs
        self.records: list[RevealRecord] = []
        self._contributors: tuple[str, ...] | None = None
        self._token: Token[Disclosure | None] | None = None

    @contextlib.contextmanager
    def contributing(self, parties: Sequence[str]) -> Iterator[None]:
        """Openings in the block are made from these parties' inputs only (default: the session's parties)."""
        before, self._contributors = self._contributors, tuple(parties)
        try:
            yield
        finally:
            self._contributors = before

    def _journal(self, what: str, receivers: Sequence[int], *, together: bool) -> None:
        """Writes the opening to the run's journal before it happens, refusing a reopening that differs."""
        if self.journal is None:
            return
        from mpcfl.mpc.session import agreed, current_party

        me = current_party()
        parties = me.session.parties
        opening = Opening(
            what=what, to=tuple(parties[r] for r in receivers), contributors=self._contributors or parties,
            inputs=self.inputs,
        )

        def check() -> None:
            reason = self.journal.conflict(opening)
            if reason is not None:
                raise RevealPolicyError(f"party {me.name}: {reason}")

        if together and self.journal.check:
            agreed(f"opening check of {what}", parties, check)
        else:
            check()
        self.journal.record(opening)

    def __enter__(self) -> Disclosure:
        if self._token is not None:
            raise RuntimeError("a Disclosure is entered once at a time")
        self._token = _active.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._token is not None
        _active.reset(self._token)
        self._token = None

    def ledger(self) -> list[dict[str, Any]]:
        """What this run revealed, as JSON-ready records."""
        return [asdict(record) for record in self.records]


_active: ContextVar[Disclosure | None] = ContextVar("mpcfl_disclosure", default=None)


def _budget() -> Budget | None:
    disclosure = _active.get()
    return None if disclosure is None else disclosure.budget


def spend(what: str, charge: Charge) -> None:
    """Charges the run's budget, if any, for noisy computation that stays secret for now
    but that later reveals depend on (each epoch of DP-SGD steps).

    Raises:
        BudgetExceeded: the charge would exceed the budget.
    """
    budget = _budget()
    if budget is not None:
        budget.charge(what, charge, computation=True)


def budget_state() -> dict[str, Any] | None:
    """The run's budget and ledger as saved data (for checkpoints); None without a budget."""
    budget = _budget()
    return None if budget is None else budget.state_dict()


def disclose(what: str, *, shape: tuple[int, ...], to: Sequence[int]) -> None:
    """Records in the run's ledger what a protocol outside MPC disclosed, and to whom.

    Private set intersection opens nothing secret-shared, yet tells parties which of their
    rows the others hold: the ledger lists it beside the reveals, marked as outside the
    DP guarantee (no noise can hide who is in the intersection the run trains on).
    """
    disclosure = _active.get()
    if disclosure is not None:
        disclosure._journal(what, sorted(to), together=False)  # only some parties disclose some things
        disclosure.records.append(RevealRecord(what=what, shape=shape, to=tuple(sorted(to)), outside_dp=True))
        if disclosure.budget is not None:
            disclosure.budget.disclosed(what)
    log.info("disclosed %s %s to ranks %s (outside DP)", what, shape, sorted(to))


def reveal(value: Any, *, to: Sequence[int], what: str, privacy: Privacy | None = None) -> torch.Tensor | None:
    """Decrypts a secret-shared value for the receiving ranks only.

    Every party must call it at the same point with the same arguments.

    Args:
        value: the ``CrypTensor`` to open.
        to: ranks that receive the plaintext; the others learn nothing.
        what: a description for the ledgers and the logs.
        privacy: the reveal's DP charge and noise; required when the run's disclosure has a budget.

    Returns:
        The plaintext on a receiving rank, as a CPU tensor whatever the session's device
        (:func:`mpcfl.mpc.device.to_host`); ``None`` on every other rank.

    Raises:
        RevealPolicyError: bad receivers, or no privacy charge under a budget.
        BudgetExceeded: the charge would exceed the budget; nothing is revealed.
    """
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.device import to_host
    from mpcfl.mpc.opening import rerandomized
    crypten = import_crypten()
    comm = crypten.comm.get()
    world, me = comm.get_world_size(), comm.get_rank()
    receivers = tuple(sorted(set(to)))
    if not receivers or len(receivers) != len(to) or not all(0 <= r < world for r in receivers):
        raise RevealPolicyError(f"reveal of {what}: invalid receivers {list(to)} for {world} parties")
    disclosure = _active.get()
    if disclosure is not None:
        disclosure._journal(what, receivers, together=True)  # before the charge: a refused opening costs nothing
    budget = _budget()
    epsilon = None
    if budget is not None:
        if privacy is None:
            raise RevealPolicyError(f"reveal of {what}: the job has a privacy budget, and this reveal declares no charge")
        if privacy.charge is None:
            budget.record(what)
            epsilon = budget.spent()
        else:
            epsilon = budget.charge(what, privacy.charge)
    if privacy is not None and privacy.charge is not None and privacy.scale > 0:
        value = value.clone()
        add_noise(value, privacy.charge.mechanism, privacy.scale, colluders=privacy.colluders, source=privacy.source)
    if disclosure is not None:
        disclosure.records.append(RevealRecord(what=what, shape=tuple(value.size()), to=receivers, epsilon_after=epsilon))
    log.debug("revealing %s %s to ranks %s", what, tuple(value.size()), receivers)
    if world > 2:  # what an opening shows of a share must not be strippable by a few colluders
        value = rerandomized(value)
    if len(receivers) == world:
        return to_host(value.get_plain_text())
    result = None
    for rank in receivers:
        opened = value.get_plain_text(dst=rank)
        if rank == me:
            result = to_host(opened)
    return result


def add_noise(value: Any, mechanism: str, scale: float, *, colluders: int, source: str, generator: Any = None) -> None:
    """Adds DP noise of ``scale`` (in the value's units) to the secret ``value`` in place, drawn jointly.

    ``source="dealer"``: the dealer draws Skellam noise of variance ``scale^2`` and shares it, so no
    party knows it and its whole variance counts against any coalition of parties (a dealer that
    colludes breaks every secret anyway). ``"parties"``: each party adds a share of its own,
    sized so that any ``n - colluders`` honest shares reach ``scale`` (:mod:`mpcfl.dp.noise`).

    Args:
        mechanism: ``gaussian`` or ``laplace`` (``laplace``: parties only).
        generator: the parties' numpy generator; default a fresh cryptographic one.
    """
    from mpcfl.dp.noise import add_noise_share, noise_share
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.prng import numpy_generator

    crypten = import_crypten()
    fixed_point = value.encoder.scale
    if source == "dealer":
        if mechanism != "gaussian":
            raise RevealPolicyError(f"the dealer draws Gaussian (Skellam) noise only, not {mechanism}")
        provider = crypten.mpc.get_default_provider()
        # whole ring units squared: every party digests the same request, whatever rounding its z carried
        variance = float(round((scale * fixed_point) ** 2))
        share = provider.generate_noise(tuple(value.size()), variance, device=value.device)
        value.share = value.share + share.reshape(value.share.shape)
        return
    share = noise_share(
        mechanism, tuple(value.size()), scale, parties=crypten.comm.get().get_world_size(), colluders=colluders,
        fixed_point=fixed_point, generator=generator if generator is not None else numpy_generator(),
    )
    add_noise_share(value, share)
