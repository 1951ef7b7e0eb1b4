"""FedProx (Li et al. 2020): FedAvg whose local loss keeps each party near the global model."""

from __future__ import annotations

import torch

from mpcfl.tasks.federated.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """Adds ``mu / 2 * ||w - w_global||^2`` to every local step's loss; aggregates as FedAvg."""

    name = "fedprox"

    def local_penalty(self, weights: torch.Tensor, global_weights: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.spec.mu * (weights - global_weights).square().sum()
