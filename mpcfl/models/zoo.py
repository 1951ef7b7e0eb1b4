"""Reference architectures for examples and benchmarks (factories for ``model.factory``)."""

from __future__ import annotations

from torch import nn


def mlp_784() -> nn.Sequential:
    """MLP 784-128-128-10 on flattened 28x28 images."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def lenet5() -> nn.Sequential:
    """LeNet-5 on 1x28x28 images (LeCun et al., 1998), with ReLU and max pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def digits_mlp() -> nn.Sequential:
    """MLP 64-32-10 for the 8x8 digits images shipped in examples/data."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
