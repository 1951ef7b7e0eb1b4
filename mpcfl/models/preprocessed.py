"""A trained model with the job's preprocessing in front: raw rows in, logits (or a regression's
values, in the label's units) out, in plain PyTorch.

Training scales each party's columns (its own standardisation statistics, or the job's public
``data.scaling``), and under DP clamps them to ``data.max_abs`` and, for logistic regression, clips
each party's slice of a row to a norm; with a backbone (``data.backbone``), its outputs are those columns.
:class:`Preprocessed` does the same to the raw columns of all parties (through the backbone first where
training ran it), in the training order, then runs the model, so whoever holds all the columns scores rows
without reading any of mpcfl's source. It traces to ONNX like any module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Cells read as missing, here and by mpcfl.data.encode (case-insensitive).
MISSING_CELLS = frozenset({"", "na", "nan", "null", "none"})


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
        imputed: each filled column's value (``data.missing``), for :meth:`encode`.
        classes: the label's class names (``labels.classes``), or None.
        backbone: the job's public backbone (``data.backbone``), run first on the raw columns of the
            parties ``inputs`` marks, or None.
        inputs: per party, in order: its number of raw columns, and whether they go through ``backbone``.
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
        imputed: Mapping[str, float] | None = None,
        classes: Sequence[str] | None = None,
        backbone: nn.Module | None = None,
        inputs: Sequence[tuple[int, bool]] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.columns = list(columns)
        self.register_buffer("center", torch.tensor(list(center), dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32))
        self.clamp = clamp
        self.row_clip = [tuple(item) for item in row_clip]
        self.target = target
        self.imputed = dict(imputed or {})
        self.classes = None if classes is None else list(classes)
        self.backbone = backbone
        self.inputs = [tuple(item) for item in inputs]

    def encode(self, table: Mapping[str, Sequence[Any]]) -> torch.Tensor:
        """Raw cells as the parties' files hold them (``{column: cells}``, e.g. a DataFrame), as this
        model's input: categories one-hot (``column=category``; a value outside the list goes to
        ``column=other`` when there is one), missing cells filled as training filled them.

        Raises:
            ValueError: a column is absent, a category unknown, or a cell missing or not a number.
        """
        out = []
        for name in self.columns:
            column, _, category = name.partition("=")
            if column not in table:
                raise ValueError(f"no column {column!r}: the model takes {self.columns}")
            cells = [str(cell).strip() for cell in table[column]]
            if category:
                known = {c.partition("=")[2] for c in self.columns if c.partition("=")[0] == column}
                unknown = [c for c in cells if c not in known]
                if unknown and "other" not in known:
                    raise ValueError(f"column {column!r}: {unknown[0]!r} is none of its categories {sorted(known)}")
                out.append([1.0 if c == category or (category == "other" and c not in known) else 0.0 for c in cells])
            else:
                out.append([self._number(column, cell) for cell in cells])
        return torch.tensor(out, dtype=torch.float32).T.reshape(-1, len(self.columns))

    def _number(self, column: str, cell: str) -> float:
        if cell.lower() in MISSING_CELLS:
            if column not in self.imputed:
                raise ValueError(f"column {column!r}: a missing cell, and training filled none in this column")
            return self.imputed[column]
        try:
            return float(cell)
        except ValueError:
            raise ValueError(f"column {column!r}: {cell!r} is not a number") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:  # each party's raw columns, through the backbone where training ran it
            parts, start = [], 0
            for count, runs in self.inputs:
                part = x[:, start:start + count]
                parts.append(self.backbone(part) if runs else part)
                start += count
            x = torch.cat(parts, dim=1)
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
