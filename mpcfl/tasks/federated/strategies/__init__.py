"""Federated strategies by name: one file each, listed here (and its spec in the job schema)."""

from __future__ import annotations

from typing import Any

from mpcfl.tasks.federated.strategies.base import Strategy
from mpcfl.tasks.federated.strategies.fedadam import FedAdam
from mpcfl.tasks.federated.strategies.fedavg import FedAvg
from mpcfl.tasks.federated.strategies.fedavgm import FedAvgM
from mpcfl.tasks.federated.strategies.fedprox import FedProx

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam)}


def strategy_of(spec: Any) -> Strategy:
    """The strategy a job's ``federated.strategy`` names, built from its parameters."""
    return STRATEGIES[spec.name](spec)


__all__ = ["STRATEGIES", "Strategy", "strategy_of"]
