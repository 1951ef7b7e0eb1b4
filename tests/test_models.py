from __future__ import annotations

import pytest
import torch

from mpcfl.models.spec import ModelSpec
from mpcfl.errors import MpcflError
from mpcfl.models.build import build_torch_model, to_crypten


def test_mlp_layers_and_seeded_init() -> None:
    spec = ModelSpec(type="mlp", hidden=[8, 4], num_classes=3)
    model = build_torch_model(spec, n_features=5, seed=1)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model[-1].out_features == 3
    again = build_torch_model(spec, n_features=5, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_logistic_regression_has_one_logit() -> None:
    model = build_torch_model(ModelSpec(type="logistic_regression"), n_features=7, seed=0)
    assert len(model) == 1 and model[0].out_features == 1


def test_crypten_model_has_the_same_names_and_outputs() -> None:
    model = build_torch_model(ModelSpec(type="mlp", hidden=[6], activation="sigmoid"), n_features=4, seed=0)
    secure = to_crypten(model)
    assert [n for n, _ in secure.named_parameters()] == list(model.state_dict())
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(secure(x), model(x), atol=1e-6)


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(MpcflError, match="layer Tanh is not supported"):
        to_crypten(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
