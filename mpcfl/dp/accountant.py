"""Privacy accountants: a small interface over Google's dp-accounting.

An :class:`Accountant` composes :class:`Charge` records (plain data, so a ledger
can be saved and reloaded) and reports epsilon at a delta. Implementations live
in :data:`ACCOUNTANTS` by name; the job picks one with ``dp.accountant``.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp


@dataclass(frozen=True)
class Charge:
    """One privacy-consuming release, as plain data.

    Args:
        mechanism: ``gaussian`` (noise standard deviation = ``noise_multiplier`` x sensitivity).
        noise_multiplier: noise standard deviation over the L2 sensitivity.
        count: how many times the mechanism is applied to any one record
            (e.g. once per epoch for DP-SGD over disjoint public batches).
    """

    mechanism: str
    noise_multiplier: float
    count: int = 1

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.mechanism != "gaussian":
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        event = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return event if self.count == 1 else dp_accounting.SelfComposedDpEvent(event, self.count)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Accountant(abc.ABC):
    """Composes charges and answers epsilon(delta)."""

    name: str

    def __init__(self) -> None:
        self.history: list[Charge] = []

    @abc.abstractmethod
    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        """A new dp-accounting accountant of this kind."""

    def epsilon(self, delta: float, *, extra: list[Charge] | None = None) -> float:
        """Epsilon at ``delta`` for the history, plus ``extra`` charges not yet made."""
        accountant = self._fresh()
        for charge in [*self.history, *(extra or [])]:
            accountant.compose(charge.to_dp_event())
        return float(accountant.get_epsilon(delta))

    def compose(self, charge: Charge) -> None:
        self.history.append(charge)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.name, "history": [c.as_dict() for c in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.name:
            raise ValueError(f"state is for accountant {state.get('accountant')!r}, not {self.name!r}")
        self.history = [Charge(**c) for c in state["history"]]


class RdpAccountant(Accountant):
    name = "rdp"

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        return rdp.RdpAccountant()


class PldAccountant(Accountant):
    name = "pld"

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        return pld.PLDAccountant()


ACCOUNTANTS: dict[str, type[Accountant]] = {cls.name: cls for cls in (RdpAccountant, PldAccountant)}


def create_accountant(name: str) -> Accountant:
    """Raises ValueError for an unknown accountant name."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r} (known: {', '.join(ACCOUNTANTS)})") from None


def calibrate_noise_multiplier(*, epsilon: float, delta: float, count: int, accountant: str) -> float:
    """The smallest Gaussian noise multiplier whose ``count``-fold composition stays within (epsilon, delta)."""
    factory = ACCOUNTANTS[accountant]

    def make(noise_multiplier: float) -> dp_accounting.DpEvent:
        return Charge("gaussian", noise_multiplier, count).to_dp_event()

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: factory()._fresh(),
            make,
            epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
