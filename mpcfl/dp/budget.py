"""The privacy budget and its ledger: every charge is checked before the reveal it pays for."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcfl.dp.accountant import Accountant, Charge, create_accountant
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

    @classmethod
    def create(cls, *, epsilon: float, delta: float, accountant: str) -> Budget:
        return cls(epsilon=epsilon, delta=delta, accountant=create_accountant(accountant))

    def spent(self) -> float:
        """Epsilon spent so far at the budget's delta (0 before any charge)."""
        return self.accountant.epsilon(self.delta) if self.accountant.history else 0.0

    def charge(self, what: str, charge: Charge) -> float:
        """Records ``charge`` for the reveal ``what``, or refuses it.

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
        self.accountant.compose(charge)
        self.ledger.append({"what": what, **charge.as_dict(), "epsilon_after": after})
        self.persist()
        log.info("privacy: %s costs epsilon %.4g of %g (delta %g)", what, after, self.epsilon, self.delta)
        return after

    def persist(self) -> None:
        """Writes the budget and ledger to ``path`` (atomically), if it has one."""
        if self.path is not None:
            write_json(self.path, {**self.state_dict(), "spent": self.spent()})

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
