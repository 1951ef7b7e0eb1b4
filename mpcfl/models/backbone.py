"""A public, frozen backbone (``data.backbone``): a torch module each party runs on its own rows, in
plaintext, before anything is shared; its outputs are that party's features for the head trained
under MPC (private fine-tuning, :mod:`mpcfl.data.party`).

The backbone is public: every party builds the same module from the job (a factory, and optionally
a state dict), and :func:`backbone_digest` (its architecture, parameters and buffers) enters the job's
fingerprint (:meth:`mpcfl.jobs.schema.JobBase.fingerprint`), which the parties prove to each other
before sharing, so a party with another backbone is refused by its peers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.models.factory import build_factory_model

# What a backbone's batch is cut to: bounds its activations' memory on a party's whole file.
_BATCH_ROWS = 4096


def build_backbone(factory: str, weights: Path | None = None) -> nn.Module:
    """The backbone: ``factory`` called with no arguments, ``weights`` (a state dict, loaded without
    unpickling code) loaded into it, in eval mode with gradients off.

    Raises:
        MpcflError: the factory fails, or the weights are missing, unreadable or do not fit it
            (the message leaves the key to the caller).
    """
    module = build_factory_model(factory)
    if weights is not None:
        if not weights.is_file():
            raise MpcflError(f"{weights}: weights file not found")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as err:  # a foreign file: any failure becomes one line
            first = (str(err).strip().splitlines() or [""])[0]
            raise MpcflError(f"{weights}: not a state dict of {factory}: {type(err).__name__}: {first}") from None
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def backbone_digest(module: nn.Module) -> str:
    """SHA-256 of the module's architecture (its repr: layer types and sizes) and of every parameter
    and buffer (name, dtype, shape, bytes): what every party's copy must agree on."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def run_backbone(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The backbone's features of rows ``x`` (float32 in, float64 out, as the data path holds them).

    Raises:
        ValueError: the module fails on the rows, or returns anything but one finite float row per
            input row (the caller names the key and the party).
    """
    rows = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for start in range(0, max(len(rows), 1), _BATCH_ROWS):
            try:
                out = module(rows[start:start + _BATCH_ROWS])
            except Exception as err:  # user code: one line
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"fails on {x.shape[1]} input columns: {type(err).__name__}: {first}") from None
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.is_floating_point():
                what = f"a {out.dim()}-D {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"returned {what}; a backbone returns a 2-D float tensor (rows x features)")
            outputs.append(out)
    features = torch.cat(outputs).double().numpy()
    if features.shape[0] != x.shape[0]:
        raise ValueError(f"returned {features.shape[0]} rows for {x.shape[0]}")
    bad = ~np.isfinite(features)
    if bad.any():
        row, column = map(int, np.argwhere(bad)[0])
        raise ValueError(f"returned {features[row, column]} (feature {column}, data row {row + 1}); features must be finite")
    return features
