"""The privacy budget and its ledger: every charge is checked before the reveal it pays for."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcfl.dp.accountant import Accountant, Charge, create_accountant
from mpcfl.dp.ledger import Binding
from mpcfl.errors import MpcflError
from mpcfl.outputs import write_json

log = logging.getLogger(__name__)


class BudgetExceeded(MpcflError):
    """A reveal would spend more privacy than the job allows; nothing was revealed."""


@dataclass
class Budget:
    """A target (epsilon, delta), the accountant that tracks it, and the ledger of what was spent.

    Every party keeps an identical budget: charges depend only on the public job.
    """

    epsilon: float
    delta: float
    accountant: Accountant
    ledger: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None  # where every charge is persisted at once, so a crash loses none
    notes: dict[str, Any] = field(default_factory=dict)  # mechanism details saved with the ledger
    dataset: Binding | None = None  # the data owner's ledgers of its data files, across runs (mpcfl.dp.ledger)

    @classmethod
    def create(cls, *, epsilon: float, delta: float, accountant: str) -> Budget:
        return cls(epsilon=epsilon, delta=delta, accountant=create_accountant(accountant, epsilon=epsilon))

    def spent(self) -> float:
        """Epsilon spent so far at the budget's delta (0 before any charge)."""
        return self.accountant.epsilon(self.delta) if self.accountant.history else 0.0

    def charge(self, what: str, charge: Charge, *, computation: bool = False) -> float:
        """Records ``charge`` for the reveal ``what``, or refuses it. ``computation``: the charge is for
        noisy computation that stays secret-shared (an epoch of DP-SGD steps), which later releases
        depend on; the entry says so, and a resume drops it when no release followed it
        (the training runner's ``drop_unreleased``).

        Returns:
            Epsilon spent after this charge.

        Raises:
            BudgetExceeded: the charge would take epsilon past the budget; the
                ledger is unchanged and the caller must not reveal.
        """
        after = self.accountant.epsilon(self.delta, extra=[charge])
        if after > self.epsilon * (1 + 1e-9):
            raise BudgetExceeded(
                f"reveal of {what} refused: it would spend epsilon {after:.4g} at delta {self.delta:g}, "
                f"beyond the budget of {self.epsilon:g} (spent so far: {self.spent():.4g})"
            )
        if self.dataset is not None:  # checked and written under the ledgers' locks, before anything is revealed
            self.dataset.charge(self.accountant.history, charge)
        self.accountant.compose(charge)
        self.ledger.append({"what": what, **charge.as_dict(), "epsilon_after": after, **({"computation": True} if computation else {})})
        self.persist()
        log.info("privacy: %s costs epsilon %.4g of %g (delta %g)", what, after, self.epsilon, self.delta)
        return after

    def record(self, what: str) -> None:
        """Records a release that is post-processing of what was already charged (it costs nothing)."""
        self.ledger.append({"what": what, "post_processing": True, "epsilon_after": self.spent()})
        self.persist()

    def disclosed(self, what: str) -> None:
        """Records a disclosure that no DP mechanism covers (who is in a private set intersection):
        in the ledger, at no charge, marked as outside the guarantee."""
        self.ledger.append({"what": what, "outside_dp": True, "epsilon_after": self.spent()})
        self.persist()

    def persist(self) -> None:
        """Writes the budget and ledger to ``path`` (atomically), if it has one."""
        if self.path is not None:
            write_json(self.path, {**self.state_dict(), "spent": self.spent()})
        if self.dataset is not None:
            self.dataset.record(self.accountant.history)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant.state_dict(),
            "ledger": list(self.ledger),
            "notes": dict(self.notes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ValueError for a budget with another epsilon, delta or accountant."""
        if (state["epsilon"], state["delta"]) != (self.epsilon, self.delta):
            raise ValueError("the saved budget has a different epsilon or delta")
        self.accountant.load_state_dict(state["accountant"])
        self.ledger = list(state["ledger"])

    def later(self, earlier: dict[str, Any]) -> list[dict[str, Any]]:
        """The entries after ``earlier``'s (a saved :meth:`state_dict` this ledger extends)."""
        return self.ledger[len(earlier.get("ledger", [])):]

    def rewind(self, earlier: dict[str, Any]) -> int:
        """Goes back to ``earlier`` (a saved :meth:`state_dict` this ledger extends) and persists it.

        Returns:
            How many entries were dropped.
        """
        dropped = len(self.later(earlier))
        self.load_state_dict(earlier)
        self.persist()
        return dropped

    def extends(self, earlier: dict[str, Any]) -> bool:
        """Whether this ledger is ``earlier``'s (a saved :meth:`state_dict`) plus later charges:
        the same budget, and ``earlier``'s entries as its first ones."""
        return (
            (earlier.get("epsilon"), earlier.get("delta")) == (self.epsilon, self.delta)
            and earlier.get("accountant", {}).get("accountant") == self.accountant.name
            and self.ledger[: len(earlier.get("ledger", []))] == earlier.get("ledger")
        )


def is_release(entry: dict[str, Any]) -> bool:
    """Whether a ledger entry records something opened from MPC under DP (a charged reveal, or one
    that is post-processing of earlier charges): not a charge for secret computation, nor a
    disclosure outside DP (a private set intersection, made again by a resumed run)."""
    return not entry.get("computation") and not entry.get("outside_dp")


def check_parameters(*, epsilon: float, delta: float, n: int | None, units: str = "rows") -> list[str]:
    """Plausibility of a budget that protects each of ``n`` units (None: n not known yet): DP-SGD's
    training rows, or client-level DP's parties (``units`` names them in the messages).

    delta is the probability that the guarantee fails outright; at delta >= 1/n a mechanism
    that publishes one random unit in full is (0, delta)-DP, so nothing is protected.

    Returns:
        Warnings: delta above 1/(10 n), or epsilon above 10 (a factor e^10 on any inference).

    Raises:
        ValueError: delta >= 1/n.
    """
    warnings = []
    if n is not None:
        if delta >= 1 / n:
            raise ValueError(f"delta {delta:g} is at least 1/n = {1 / n:.3g} for n = {n} {units}: "
                             "publishing one of them at random would meet it; use delta well below 1/n")
        if delta > 1 / (10 * n):
            warnings.append(f"delta {delta:g} is above 1/(10 n) = {1 / (10 * n):.3g} for n = {n} {units}; "
                            "delta is usually far below 1/n")
    if epsilon > 10:
        warnings.append(f"epsilon {epsilon:g} is above 10: the guarantee bounds an attacker's odds only by e^{epsilon:g}")
    return warnings
