"""FedAvgM (Hsu et al. 2019): server momentum over the revealed average updates."""

from __future__ import annotations

import torch

from mpcfl.tasks.federated.strategies.base import Strategy


class FedAvgM(Strategy):
    """``v <- momentum * v + average; w <- w + server_lr * v`` (v starts at zero)."""

    name = "fedavgm"

    def apply(self, global_weights: torch.Tensor, average_update: torch.Tensor) -> torch.Tensor:
        velocity = self.state.get("velocity", torch.zeros_like(average_update))
        velocity = self.spec.momentum * velocity + average_update
        self.state["velocity"] = velocity
        return global_weights + self.spec.server_lr * velocity
