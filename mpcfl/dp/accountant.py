"""Privacy accountants: a small interface over Google's dp-accounting.

An :class:`Accountant` composes :class:`Charge` records (plain data, so a ledger
can be saved and reloaded) and reports epsilon at a delta. Implementations live
in :data:`ACCOUNTANTS` by name; the job picks one with ``dp.accountant``.
"""

from __future__ import annotations

import abc
import importlib
import types
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting


def _dp(module: str = "") -> types.ModuleType:
    """dp-accounting (or one of its modules), imported on first use: it pulls in scipy, about
    a second of start-up in every party and dealer process, which jobs without DP never need."""
    return importlib.import_module("dp_accounting" + (f".{module}" if module else ""))


@dataclass(frozen=True)
class Charge:
    """One privacy-consuming release, as plain data.

    Args:
        mechanism: ``gaussian`` (standard deviation = ``noise_multiplier`` x L2 sensitivity)
            or ``laplace`` (scale b = ``noise_multiplier`` x L1 sensitivity).
        noise_multiplier: the noise scale over the sensitivity.
        count: how many times the mechanism is applied to any one record
            (e.g. once per epoch for DP-SGD over disjoint public batches).
    """

    mechanism: str
    noise_multiplier: float
    count: int = 1

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.mechanism == "gaussian":
            event = _dp().GaussianDpEvent(self.noise_multiplier)
        elif self.mechanism == "laplace":
            event = _dp().LaplaceDpEvent(self.noise_multiplier)
        else:
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        return event if self.count == 1 else _dp().SelfComposedDpEvent(event, self.count)

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
        for charge in grouped([*self.history, *(extra or [])]):
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


def grouped(charges: list[Charge]) -> list[Charge]:
    """Identical mechanisms merged into one charge with the summed count, in first-seen order.

    Composition commutes, so this changes no bound; it makes a ledger charged one epoch
    at a time compose exactly as the calibration's ``count``-fold event (PLD's
    discretisation of ten single compositions differs slightly from one ten-fold one).
    """
    counts: dict[tuple[str, float], int] = {}
    for charge in charges:
        key = (charge.mechanism, charge.noise_multiplier)
        counts[key] = counts.get(key, 0) + charge.count
    return [Charge(mechanism, z, count) for (mechanism, z), count in counts.items()]


def replace_one(bound: float) -> float:
    """The sensitivity of a sum under replace-one neighbours, when every record's term lies in a
    ball of radius ``bound`` around 0 (a clipped gradient): one term leaves and another enters,
    so the sum moves by up to twice the bound."""
    return 2 * bound


class RdpAccountant(Accountant):
    name = "rdp"

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        return _dp("rdp").RdpAccountant()


class PldAccountant(Accountant):
    name = "pld"

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        return _dp("pld").PLDAccountant()


ACCOUNTANTS: dict[str, type[Accountant]] = {cls.name: cls for cls in (RdpAccountant, PldAccountant)}


def create_accountant(name: str) -> Accountant:
    """Raises ValueError for an unknown accountant name."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r} (known: {', '.join(ACCOUNTANTS)})") from None


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, count: int, accountant: str, extra: list[Charge] | None = None
) -> float:
    """The smallest Gaussian noise multiplier whose ``count``-fold composition, together
    with the ``extra`` charges, stays within (epsilon, delta).

    Raises:
        ValueError: the extra charges alone spend the budget.
    """
    factory = ACCOUNTANTS[accountant]
    extra = extra or []
    if extra:
        alone = factory()
        for charge in extra:
            alone.compose(charge)
        if alone.epsilon(delta) >= epsilon:
            raise ValueError(f"the other charges alone spend epsilon {alone.epsilon(delta):.4g} of {epsilon:g}")

    def make(noise_multiplier: float) -> dp_accounting.DpEvent:
        events = [Charge("gaussian", noise_multiplier, count).to_dp_event(), *(c.to_dp_event() for c in extra)]
        return _dp().ComposedDpEvent(events)

    return float(
        _dp().calibrate_dp_mechanism(
            lambda: factory()._fresh(),
            make,
            epsilon,
            delta,
            _dp().LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
