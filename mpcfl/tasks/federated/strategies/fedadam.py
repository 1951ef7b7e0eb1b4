"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server."""

from __future__ import annotations

import torch

from mpcfl.tasks.federated.strategies.base import Strategy


class FedAdam(Strategy):
    """The revealed average update is the pseudo-gradient (already a descent direction)::

        m <- beta1 m + (1 - beta1) avg;  v <- beta2 v + (1 - beta2) avg^2;  w <- w + server_lr m / (sqrt(v) + tau)

    As in the paper, without bias correction; ``tau`` bounds the step where v is small.
    """

    name = "fedadam"

    def apply(self, global_weights: torch.Tensor, average_update: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        m = self.state.get("m", torch.zeros_like(average_update))
        v = self.state.get("v", torch.zeros_like(average_update))
        m = spec.beta1 * m + (1 - spec.beta1) * average_update
        v = spec.beta2 * v + (1 - spec.beta2) * average_update.square()
        self.state.update(m=m, v=v)
        return global_weights + spec.server_lr * m / (v.sqrt() + spec.tau)
