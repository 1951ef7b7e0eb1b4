"""A public, frozen backbone (``data.backbone``): a torch module each party runs on its own rows, in
plaintext, before anything is shared; its outputs are that party's features for the head trained
under MPC (private fine-tuning, :mod:`mpcfl.data.party`).

The backbone is public: every party builds the same module from the job (a factory, and optionally
a state dict), and :func:`backbone_digest` (the source files of its layer classes, its architecture,
parameters and buffers) enters the job's fingerprint (:meth:`mpcfl.jobs.schema.JobBase.fingerprint`), which the parties prove to each other
before sharing, so a party with another backbone is refused by its peers.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.models.factory import build_factory_model

log = logging.getLogger(__name__)

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
    """SHA-256 of what the module computes, as every party's copy must agree on: the source file of
    each layer class not from torch (its ``forward``: two factories with the same layers but another
    forward differ here), the architecture (its repr: layer types and sizes) and every parameter
    and buffer (name, dtype, shape, bytes).

    Raises:
        MpcflError: a layer class without a source file to read (defined interactively).
    """
    digest = hashlib.sha256(repr(module).encode())
    files = set().union(*(_source_files(type(layer)) for layer in module.modules()))
    for path in sorted(files):
        digest.update(b"\0source\0" + Path(path).read_bytes())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def _source_files(cls: type) -> set[str]:
    """The files defining the methods of ``cls`` and of its bases outside torch (read from their code
    objects: a factory file's classes need not be importable by module name).

    Raises:
        MpcflError: a method defined outside any file (interactively, or by exec of a string).
    """
    files = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        for value in vars(klass).values():
            code = getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None
            if code is None:
                continue
            if not Path(code.co_filename).is_file():
                raise MpcflError(f"layer class {cls.__qualname__} has code outside any file ({code.co_filename}), "
                                 "so it cannot enter the fingerprint")
            files.add(code.co_filename)
    return files


def run_backbone(module: nn.Module, x: np.ndarray, *, dp: bool = False) -> np.ndarray:
    """The backbone's features of rows ``x`` (float32 in, float64 out, as the data path holds them).

    Each row goes through the module alone (``torch.func.vmap`` over rows), so one record changes
    only its own features: a forward that mixes rows (batch statistics, ``x - x.mean(0)``) cannot
    spread it, which per-example DP relies on; state the forward changes is refused. Under DP
    (``dp``) non-finite features become 0, counted in this party's own log: refusing would make
    the job's outcome depend on one record.

    Raises:
        ValueError: the module fails on the rows (or on one row alone), changes its parameters or
            buffers, or returns anything but one float row per input row, finite unless ``dp``
            (the caller names the key and the party).
    """
    rows = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    before = backbone_digest(module)
    alone = torch.func.vmap(lambda row: module(row.unsqueeze(0)))
    outputs = []
    with torch.no_grad():
        for start in range(0, max(len(rows), 1), _BATCH_ROWS):
            try:
                out = alone(rows[start:start + _BATCH_ROWS])
            except Exception as err:  # user code: one line
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"fails on {x.shape[1]} input columns, one row at a time: {type(err).__name__}: {first}") from None
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[1] != 1 or not out.is_floating_point():
                what = f"a {out.dim() - 1}-D {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"returned {what} for one row; a backbone returns a 2-D float tensor (rows x features)")
            outputs.append(out[:, 0])
    if backbone_digest(module) != before:
        raise ValueError("changed its own parameters or buffers while running; a backbone is frozen")
    features = torch.cat(outputs).double().numpy()
    bad = ~np.isfinite(features)
    if bad.any() and dp:
        log.warning("data.backbone: %d non-finite features in %d rows set to 0 (under DP; seen only here)",
                    int(bad.sum()), int(bad.any(axis=1).sum()))
        features[bad] = 0.0
    elif bad.any():
        row, column = map(int, np.argwhere(bad)[0])
        raise ValueError(f"returned {features[row, column]} (feature {column}, data row {row + 1}); features must be finite")
    return features
