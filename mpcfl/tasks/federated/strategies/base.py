"""The shape of a federated strategy (Flower's): what a party adds to its local loss, and how the
revealed average update moves the global model.

Every party holds the same strategy state and applies the same public average, so the global
model stays identical everywhere without any further communication. State is plain tensors, so
a checkpoint loads it with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch


class Strategy(abc.ABC):
    """One federated optimisation strategy, built from its job spec (``federated.strategy``)."""

    name: ClassVar[str]

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.state: dict[str, torch.Tensor] = {}

    def local_penalty(self, weights: torch.Tensor, global_weights: torch.Tensor) -> torch.Tensor | None:
        """A term added to the local loss, given the flat local and global weights; None: none."""
        return None

    @abc.abstractmethod
    def apply(self, global_weights: torch.Tensor, average_update: torch.Tensor) -> torch.Tensor:
        """The next global weights (flat, float64) from this round's revealed average update."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {key: value.clone() for key, value in state.items()}
