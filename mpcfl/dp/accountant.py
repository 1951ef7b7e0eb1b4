"""Privacy accountants: a small interface over Google's dp-accounting.

An :class:`Accountant` composes :class:`Charge` records (plain data, so a ledger
can be saved and reloaded) and reports epsilon at a delta. Implementations live
in :data:`ACCOUNTANTS` by name; the job picks one with ``dp.accountant``.
"""

from __future__ import annotations

import abc
import importlib
import logging
import math
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting


def _dropped_order(record: logging.LogRecord) -> bool:
    """False for dp-accounting's warning that it dropped an RDP order it could not compute (at high
    sampling rates, hundreds per calibration). Dropping an order is conservative: epsilon is the
    minimum over the orders kept, each a valid bound, so the warning says nothing to act on."""
    return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


def _dp(module: str = "") -> types.ModuleType:
    """dp-accounting (or one of its modules), imported on first use: it pulls in scipy, about
    a second of start-up in every party and dealer process, which jobs without DP never need."""
    imported = importlib.import_module("dp_accounting" + (f".{module}" if module else ""))
    absl = logging.getLogger("absl")  # after the import: absl has made it its own logger class by then
    if _dropped_order not in absl.filters:
        absl.addFilter(_dropped_order)
    return imported


@dataclass(frozen=True)
class Charge:
    """One privacy-consuming release, as plain data.

    Args:
        mechanism: ``gaussian`` (standard deviation = ``noise_multiplier`` x L2 sensitivity)
            or ``laplace`` (scale b = ``noise_multiplier`` x L1 sensitivity).
        noise_multiplier: the noise scale over the sensitivity.
        count: how many times the mechanism is applied to any one record
            (e.g. once per epoch for DP-SGD over disjoint public batches).
        sampling_probability: q < 1: each application sees a Poisson sample of the records, each
            record in it with probability q, independently and secretly (add/remove neighbours);
            1: every application sees the record.
    """

    mechanism: str
    noise_multiplier: float
    count: int = 1
    sampling_probability: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.sampling_probability <= 1:
            raise ValueError(f"sampling probability must be in (0, 1], got {self.sampling_probability}")

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.mechanism == "gaussian":
            event = _dp().GaussianDpEvent(self.noise_multiplier)
        elif self.mechanism == "laplace":
            event = _dp().LaplaceDpEvent(self.noise_multiplier)
        else:
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        if self.sampling_probability < 1:
            event = _dp().PoissonSampledDpEvent(self.sampling_probability, event)
        return event if self.count == 1 else _dp().SelfComposedDpEvent(event, self.count)

    def as_dict(self) -> dict[str, Any]:
        """The charge as plain data; an unsampled charge without ``sampling_probability``, so ledgers
        written before sampling existed read back, and compare, unchanged."""
        state = asdict(self)
        if self.sampling_probability == 1:
            del state["sampling_probability"]
        return state


class Accountant(abc.ABC):
    """Composes charges and answers epsilon(delta).

    Args:
        epsilon: the budget its answers are checked against, where known; PLD discretises
            relative to it.
    """

    name: str

    def __init__(self, epsilon: float | None = None) -> None:
        self.history: list[Charge] = []
        self.target = epsilon

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
    counts: dict[tuple[str, float, float], int] = {}
    for charge in charges:
        key = (charge.mechanism, charge.noise_multiplier, charge.sampling_probability)
        counts[key] = counts.get(key, 0) + charge.count
    return [Charge(mechanism, z, count, q) for (mechanism, z, q), count in counts.items()]


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
    """dp-accounting's privacy loss distributions, on a grid of 1e-4 x max(1, epsilon) in privacy loss.

    PLD's epsilon is pessimistic by about one grid step, so a step of 1e-4 of the budget costs
    nothing that matters (below epsilon 1 it is dp-accounting's default, 1e-4). The grid grows as
    1/(sigma x step) for a Gaussian of multiplier sigma, and at the sigma a budget calls for,
    sigma x epsilon grows with epsilon: the grid stays under about 5e4 points whatever the budget
    (delta 1e-5), where a fixed 1e-4 needs 1.7e6 points and 7 s per evaluation at epsilon 100.
    """

    name = "pld"

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        step = 1e-4 * max(1.0, self.target or 1.0)
        return _dp("pld").PLDAccountant(value_discretization_interval=step)


ACCOUNTANTS: dict[str, type[Accountant]] = {cls.name: cls for cls in (RdpAccountant, PldAccountant)}


def create_accountant(name: str, *, epsilon: float | None = None) -> Accountant:
    """The accountant ``name``, for a budget of ``epsilon`` where known (see :class:`Accountant`).

    Raises ValueError for an unknown accountant name."""
    try:
        return ACCOUNTANTS[name](epsilon)
    except KeyError:
        raise ValueError(f"unknown accountant {name!r} (known: {', '.join(ACCOUNTANTS)})") from None


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, count: int, accountant: str, extra: list[Charge] | None = None,
    sampling_probability: float = 1.0,
) -> float:
    """The smallest Gaussian noise multiplier whose ``count``-fold composition (each one on a Poisson
    sample of rate ``sampling_probability``, where below 1), together with the ``extra`` charges,
    stays within (epsilon, delta).

    The search never goes below a floor that no accountant's answer undercuts, and starts from
    RDP's answer, cheap at any multiplier: PLD's grid grows as 1/multiplier, and dp-accounting's
    default start at 1e-3 asked PLD for 750 GiB.

    Raises:
        ValueError: the extra charges alone spend the budget.
    """
    factory = ACCOUNTANTS[accountant]
    extra = extra or []
    if extra:
        alone = factory(epsilon)
        for charge in extra:
            alone.compose(charge)
        if alone.epsilon(delta) >= epsilon:
            raise ValueError(f"the releases besides DP-SGD's steps alone spend epsilon {alone.epsilon(delta):.4g} of {epsilon:g}")

    def make(noise_multiplier: float) -> dp_accounting.DpEvent:
        charge = Charge("gaussian", noise_multiplier, count, sampling_probability)
        return _dp().ComposedDpEvent([charge.to_dp_event(), *(c.to_dp_event() for c in extra)])

    def gap(kind: type[Accountant], noise_multiplier: float) -> float:
        return kind(epsilon)._fresh().compose(make(noise_multiplier)).get_epsilon(delta) - epsilon

    def search(kind: type[Accountant], low: float, guess: float) -> float:
        """The answer under ``kind``, searched upwards from [low, guess] (widened if it holds no answer)."""
        bracket = _dp().LowerEndpointAndGuess(low, guess)
        return float(_dp().calibrate_dp_mechanism(lambda: kind(epsilon)._fresh(), make, epsilon, delta, bracket, tol=1e-4))

    if sampling_probability == 1:
        floor = _gaussian_floor(epsilon=epsilon, delta=delta, count=count)
        upper = search(RdpAccountant, floor, 2 * floor)  # RDP's conversion is the looser: above PLD's answer
        return upper if factory is RdpAccountant else search(factory, floor, upper)
    # Subsampled: no closed-form floor, so halve until the budget fails (a floor by test), from
    # the unsampled floor (sampling only lowers the answer). RDP first, cheap at any multiplier;
    # PLD's floor then within a few halvings of RDP's answer.
    low = _failing(lambda z: gap(RdpAccountant, z) > 0, _gaussian_floor(epsilon=epsilon, delta=delta, count=count))
    upper = search(RdpAccountant, low, 2 * low)
    if factory is RdpAccountant:
        return upper
    return search(factory, _failing(lambda z: gap(factory, z) > 0, upper / 2), upper)


def _failing(fails: Callable[[float], bool], start: float) -> float:
    """A noise multiplier that fails the budget: ``start``, halved until it does (epsilon falls as
    the multiplier grows, so the answer lies above it)."""
    value = start
    for _ in range(64):  # past 2^-64, no budget anyone sets fails: the search then starts near 0
        if fails(value):
            break
        value /= 2
    return value


def _gaussian_floor(*, epsilon: float, delta: float, count: int) -> float:
    """A noise multiplier below which no sound accountant meets (epsilon, delta) for ``count``
    Gaussians: 0.99 of the exact one (Balle and Wang's analytic Gaussian; ``count`` Gaussians of
    multiplier z compose exactly to one of z / sqrt(count)). Other charges only raise epsilon."""
    exact = _dp("pld.privacy_loss_mechanism").GaussianPrivacyLoss.from_privacy_guarantee(
        _dp("pld.common").DifferentialPrivacyParameters(epsilon, delta)
    )
    return 0.99 * exact.standard_deviation * math.sqrt(count)
