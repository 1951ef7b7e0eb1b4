"""Model specs to plain torch modules, and torch modules to CrypTen modules.

A job's model is first built in plain torch (deterministic from the job's seed, so
every party agrees on the public initial weights), then converted layer by layer
into ``crypten.nn`` with the same parameter names. The revealed weights therefore
load straight into :func:`build_torch_model`'s module.
"""

from __future__ import annotations

from typing import Any

import torch

from mpcfl.mpc.compat import import_crypten
from mpcfl.models.heads import head_of
from mpcfl.models.spec import ModelSpec
from mpcfl.errors import MpcflError

_ACTIVATIONS = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}


def build_torch_model(spec: ModelSpec, *, n_features: int, seed: int | None = None) -> torch.nn.Sequential:
    """The plain PyTorch model a job describes.

    Args:
        spec: the job's ``model`` section.
        n_features: input width (all parties' feature columns together).
        seed: seeds the initial weights; ``None`` leaves torch's global generator alone.
    """
    sizes = [n_features, *spec.hidden, head_of(spec).output_size]
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(_ACTIVATIONS[spec.activation]())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    if seed is not None:
        torch.random.set_rng_state(generator_state)
    return torch.nn.Sequential(*layers)


def _convert_layer(layer: torch.nn.Module, crypten: Any) -> Any:
    if isinstance(layer, torch.nn.Linear):
        out = crypten.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        for name, param in layer.named_parameters():
            out.set_parameter(name, param.detach().clone())
        return out
    if isinstance(layer, torch.nn.ReLU):
        return crypten.nn.ReLU()
    if isinstance(layer, torch.nn.Sigmoid):
        return crypten.nn.Sigmoid()
    raise MpcflError(f"layer {type(layer).__name__} is not supported in a secure Sequential model")


def to_crypten(model: torch.nn.Sequential) -> Any:
    """An unencrypted ``crypten.nn.Sequential`` with the same layers and parameter names.

    Raises:
        MpcflError: a layer has no CrypTen counterpart here.
    """
    crypten = import_crypten()
    return crypten.nn.Sequential(*(_convert_layer(layer, crypten) for layer in model))
