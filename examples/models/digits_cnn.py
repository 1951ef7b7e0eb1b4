"""A small CNN for the 8x8 digits, for secure training (``configs/digits_cnn.yaml``).

A job names it as ``model.factory: ../examples/models/digits_cnn.py:digits_cnn`` (a file,
not a package: crypten installs a top-level ``examples`` package of its own). Rows arrive
as 64 pixel columns; the first layer makes them 1x8x8 images.

Chosen for MPC, where a multiplication is cheap and a comparison is not: average
pooling (a sum and a public division) rather than max pooling (comparisons), and the
pooling before the ReLU, so the ReLU compares 8x3x3 values per image instead of 8x6x6
(same plaintext accuracy on this data).
"""

from torch import nn


def digits_cnn() -> nn.Module:
    """64 pixels -> conv 3x3 (8 channels) -> 2x2 average pool -> ReLU -> 10 logits."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, kernel_size=3),  # 8 x 6 x 6
        nn.AvgPool2d(2),  # 8 x 3 x 3
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    )
