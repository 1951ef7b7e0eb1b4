"""A trained model with the job's preprocessing in front: raw rows in, logits (or a regression's
values, in the label's units) out, in plain PyTorch.

Training scales each party's columns (its own standardisation statistics, or the job's public
``data.scaling``), and under DP clamps them to ``data.max_abs`` and, for logistic regression, clips
each party's slice of a row to a norm. :class:`Preprocessed` does the same to the raw columns of all
parties, in the training order, then runs the model, so whoever holds all the columns scores rows
without reading any of mpcfl's source. It traces to ONNX like any module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Preprocessed(nn.Module):
    """``model`` on ``(x - center) / scale``, clamped and row-clipped per party slice as training was.

    Args:
        model: the trained module, on preprocessed features.
        columns: every feature column, in the order the model takes them (party by party).
        center, scale: per column (scale 1 and center 0 where training did not scale).
        clamp: every preprocessed value clamped to ``[-clamp, clamp]`` (DP), or None.
        row_clip: per party, ``(start, stop, bound)``: that slice of a row scaled down to norm ``bound`` (DP
            linear models).
        target: a regression's ``(center, scale)`` (``labels.scaling``): outputs become ``center + scale * z``.
    """

    def __init__(
        self,
        model: nn.Module,
        columns: Sequence[str],
        center: Sequence[float],
        scale: Sequence[float],
        *,
        clamp: float | None = None,
        row_clip: Sequence[tuple[int, int, float]] = (),
        target: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.columns = list(columns)
        self.register_buffer("center", torch.tensor(list(center), dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32))
        self.clamp = clamp
        self.row_clip = [tuple(item) for item in row_clip]
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.center) / self.scale
        if self.clamp is not None:
            z = z.clamp(-self.clamp, self.clamp)
        if self.row_clip:
            parts = []
            for start, stop, bound in self.row_clip:
                part = z[:, start:stop]
                norm = part.norm(dim=1, keepdim=True).clamp_min(1e-12)
                parts.append(part * (bound / norm).clamp(max=1.0))
            z = torch.cat(parts, dim=1)
        out = self.model(z)
        return out if self.target is None else out * self.target[1] + self.target[0]
