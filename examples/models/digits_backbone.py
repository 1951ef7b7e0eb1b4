"""A public backbone for the 8x8 digits, for private fine-tuning (``configs/digits_finetune.yaml``).

A job names it as ``data.backbone.factory: ../examples/models/digits_backbone.py:digits_backbone``
with ``weights: ../examples/models/digits_backbone.pt``, the weights
``examples/make_digits_backbone.py`` trains on the PUBLIC rows only. Each party runs it on its own
private rows, in plaintext, before sharing; only the head on its 32 features trains under MPC.
"""

from torch import nn

FEATURES = 32


def digits_backbone() -> nn.Module:
    """64 pixels in [0, 1] -> 64 -> ReLU -> 32 -> tanh: the first layers of a small MLP, its features
    bounded in (-1, 1) whatever the input (what DP clipping and fixed point want)."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, FEATURES), nn.Tanh())
