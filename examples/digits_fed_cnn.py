"""A small CNN for the 8x8 digits, as a federated job's model (``model.factory``).

Rows arrive flat (64 pixels in [0, 1]); the module reshapes them itself. Every party calls
``make()`` after seeding torch with ``federated.seed``, so all start from the same weights.
"""

from __future__ import annotations

from torch import nn


def make() -> nn.Module:
    """Conv(1->8, 3x3) - ReLU - MaxPool(2) - Conv(8->16, 3x3) - ReLU - MaxPool(2) - Linear(64->10)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )
