"""Per-example gradient clipping under MPC against plaintext per-example clipping (one process)."""

from __future__ import annotations

import pytest
import torch

from mpcfl.mpc.compat import import_crypten
from mpcfl.models.spec import ModelSpec
from mpcfl.dp.clipping import MARGIN, clipped_gradient_sum
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.heads import head_of
from mpcfl.mpc.reveal import reveal


def plaintext_clipped_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, binary: bool) -> dict:
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss()
    target = y if binary else y.argmax(1)
    names = [n for n, _ in model.named_parameters()]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), target[i : i + 1]), list(model.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for name, grad in zip(names, grads):
            total[name] += grad * min(1.0, clip / float(norm))
    return total, norms


@pytest.mark.parametrize(("hidden", "activation", "classes"), [([8], "relu", 2), ([6, 5], "sigmoid", 3)])
def test_clipped_sum_matches_plaintext(crypten_single: None, hidden: list[int], activation: str, classes: int) -> None:
    crypten = import_crypten()
    torch.manual_seed(0)
    spec = ModelSpec(type="mlp", hidden=hidden, activation=activation, num_classes=classes)
    torch_model = build_torch_model(spec, n_features=5, seed=0)
    x = torch.randn(12, 5) * 2
    binary = classes == 2
    y = torch.randint(0, classes, (12,))
    target = y.float().reshape(-1, 1) if binary else torch.nn.functional.one_hot(y, classes).float()
    clip = 0.5
    expected, norms = plaintext_clipped_sum(torch_model, x, target, clip, binary)
    assert max(norms) > clip > min(norms) or max(norms) > clip  # some examples really get clipped
    model = to_crypten(torch_model).encrypt(src=0)
    sums = clipped_gradient_sum(
        model, torch_model, crypten.cryptensor(x), crypten.cryptensor(target), clip=clip,
        output_error=head_of(spec).output_error,
    )
    for name, value in expected.items():
        got = reveal(sums[name], to=[0], what=f"test {name}")
        assert got.shape == value.shape
        assert torch.allclose(got, value, atol=0.03), (name, (got - value).abs().max())


def test_no_example_can_exceed_the_bound(crypten_single: None) -> None:
    """Even when 1/sqrt is far off (huge gradients), the clipped sum of one example stays within C sqrt(1+margin)."""
    crypten = import_crypten()
    spec = ModelSpec(type="mlp", hidden=[4])
    torch_model = build_torch_model(spec, n_features=3, seed=1)
    clip = 0.1
    for scale in (1e-3, 1.0, 50.0):
        x = torch.full((1, 3), scale)
        model = to_crypten(torch_model).encrypt(src=0)
        sums = clipped_gradient_sum(model, torch_model, crypten.cryptensor(x), crypten.cryptensor(torch.zeros(1, 1)), clip=clip, output_error=head_of(spec).output_error)
        norm = torch.sqrt(sum((reveal(v, to=[0], what="norm test") ** 2).sum() for v in sums.values()))
        assert norm <= clip * (1 + MARGIN) ** 0.5 + 1e-3, (scale, float(norm))
