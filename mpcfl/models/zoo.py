"""Reference architectures for examples and benchmarks (factories for ``model.factory``)."""

from __future__ import annotations

import torch
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


class DigitsViT(nn.Module):
    """A small vision transformer for the 8x8 digits (flattened rows of 64 pixels in [0, 1]).

    The image is cut into ``patch`` x ``patch`` patches (16 tokens of 4 pixels by default),
    each embedded linearly, plus learnt positions; a pre-norm GELU ``nn.TransformerEncoder``;
    mean pooling over the tokens (no class token); a linear head.
    """

    def __init__(self, patch: int = 2, dim: int = 32, heads: int = 4, layers: int = 2, hidden: int = 64,
                 classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.patch, self.grid = patch, 8 // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Parameter(torch.randn(1, self.grid**2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, g, p = x.size(0), self.grid, self.patch
        patches = x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p)
        return self.head(self.encoder(self.embed(patches) + self.position).mean(1))


def digits_vit() -> DigitsViT:
    """ViT for the 8x8 digits: 2x2 patches (16 tokens), width 32, 4 heads, 2 pre-norm GELU layers."""
    return DigitsViT()
