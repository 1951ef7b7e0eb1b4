"""A training job's model: built in plain torch, then converted to a trainable CrypTen module.

:func:`build_torch_model` is the one place a job's torch model is made, from a spec
(logistic regression, MLP) or a user's factory, seeded by the job so every party
agrees on the public initial weights. :func:`to_crypten` converts it with the same
parameter names, so the revealed weights load straight back into it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from mpcfl.errors import MpcflError
from mpcfl.models.convert import trainable
from mpcfl.models.factory import build_factory_model
from mpcfl.models.heads import head_of
from mpcfl.models.spec import FactoryModelSpec, ModelSpec, TrainModel
from mpcfl.mpc.engine import import_crypten

_ACTIVATIONS = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Torch's global generator seeded for the block, then put back as it was."""
    if seed is None:
        yield
        return
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _spec_model(spec: ModelSpec, n_features: int) -> torch.nn.Sequential:
    sizes = [n_features, *spec.hidden, head_of(spec).output_size]
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(_ACTIVATIONS[spec.activation]())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    return torch.nn.Sequential(*layers)


def check_fits(spec: FactoryModelSpec, model: torch.nn.Module, n_features: int) -> None:
    """Refuses a factory's module that does not map rows of ``n_features`` to the head's logits.

    Runs a copy on two rows of zeros, so the user's module and its state are untouched.

    Raises:
        MpcflError: names ``model.factory`` or ``model.num_classes``, and the sizes.
    """
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).eval()(torch.zeros(2, n_features))
    except Exception as err:  # user code: any failure becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MpcflError(
            f"model.factory: {spec.factory} does not take rows of {n_features} features, the data's "
            f"feature columns (fix the module's input size): {first}"
        ) from None
    expected = head_of(spec).output_size
    if not torch.is_tensor(out) or tuple(out.shape) != (2, expected):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise MpcflError(
            f"model.num_classes: {spec.num_classes} classes need {expected} output(s) per row, but "
            f"{spec.factory} gives {shape} for 2 rows"
        )


def build_torch_model(spec: TrainModel, *, n_features: int, seed: int | None = None) -> torch.nn.Module:
    """The plain PyTorch model a training job describes: its spec's, or its factory's.

    Every party, and the plaintext baseline, builds it this way, so all start from the
    same public initial weights.

    Args:
        spec: the job's ``model`` section.
        n_features: input width (all parties' feature columns together).
        seed: seeds the initial weights (torch's global generator, around the build);
            ``None`` leaves that generator alone.

    Raises:
        MpcflError: a factory fails, or its module does not fit ``n_features`` and the head
            (:func:`check_fits`).
    """
    with _seeded(seed):
        if isinstance(spec, ModelSpec):
            return _spec_model(spec, n_features)
        model = build_factory_model(spec.factory)
    check_fits(spec, model, n_features)
    return model


def _convert_layer(layer: torch.nn.Module, crypten: Any) -> Any:
    if isinstance(layer, torch.nn.Linear):
        out = crypten.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        for name, param in layer.named_parameters():
            out.set_parameter(name, param.detach().clone())
        return out
    return crypten.nn.ReLU() if isinstance(layer, torch.nn.ReLU) else crypten.nn.Sigmoid()


_SEQUENTIAL_LAYERS = (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sigmoid)


def to_crypten(model: torch.nn.Module) -> Any:
    """An unencrypted, trainable CrypTen module with ``model``'s parameter names, so the
    revealed weights load back into ``model``.

    A Sequential of Linear, ReLU and Sigmoid layers (every spec's model) becomes a
    ``crypten.nn.Sequential`` layer by layer, the form DP-SGD's per-example clipping
    reads (:mod:`mpcfl.dp.clipping`); any other module runs its torch.fx graph
    (:func:`mpcfl.models.convert.trainable`).

    Raises:
        UnsupportedModelError: a layer or construct cannot be trained under MPC here.
    """
    if isinstance(model, torch.nn.Sequential) and all(isinstance(m, _SEQUENTIAL_LAYERS) for m in model):
        crypten = import_crypten()
        return crypten.nn.Sequential(*(_convert_layer(layer, crypten) for layer in model))
    return trainable(model)
