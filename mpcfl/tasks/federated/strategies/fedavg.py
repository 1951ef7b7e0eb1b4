"""FedAvg (McMahan et al. 2017): the global model takes the parties' weighted average update."""

from __future__ import annotations

import torch

from mpcfl.tasks.federated.strategies.base import Strategy


class FedAvg(Strategy):
    """``w <- w + server_lr * average``; with server_lr 1, the weighted average of the local models."""

    name = "fedavg"

    def apply(self, global_weights: torch.Tensor, average_update: torch.Tensor) -> torch.Tensor:
        return global_weights + self.spec.server_lr * average_update
