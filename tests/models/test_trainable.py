"""A user's torch module made trainable under MPC: names, forward, CrypTen autograd, checkpoints, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import TrainJob, load_job
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.convert import UnsupportedModelError
from mpcfl.tasks.train.bounds import check_model, training_bounds


class TinyCnn(nn.Module):
    """Nested submodules, a parameter used directly, and functional calls: what fx must map back."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(2))
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.head = nn.Linear(27, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.features(x))
        return self.head(h.view(h.size(0), -1) * self.scale)


def test_gradients_through_crypten_autograd_match_torch(crypten_single: None) -> None:
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.reveal import reveal
    from mpcfl.tasks.train import checkpoint

    crypten = import_crypten()
    torch.manual_seed(0)
    model = TinyCnn()
    x, error = torch.randn(5, 36), torch.randn(5, 4)
    secure = to_crypten(model).encrypt(src=0)
    secure.train()
    assert [n for n, _ in secure.named_parameters()] == [n for n, _ in model.named_parameters()]
    # The forward, and the backward of a given output error, against torch's autograd.
    logits = secure(crypten.cryptensor(x))
    expected = model(x)
    assert torch.allclose(reveal(logits, to=[0], what="test logits"), expected.detach(), atol=2e-3)
    logits.backward(crypten.cryptensor(error))
    expected.backward(error)
    for (name, param), (_, plain) in zip(secure.named_parameters(), model.named_parameters()):
        got = reveal(param.grad, to=[0], what=f"test {name} gradient")
        assert torch.allclose(got, plain.grad, atol=5e-3), (name, (got - plain.grad).abs().max())
    # A checkpoint's shares go back into a freshly encrypted module of the same architecture.
    params, _ = checkpoint.state_of(secure, crypten.optim.SGD(secure.parameters(), lr=0.1))
    fresh = to_crypten(TinyCnn()).encrypt(src=0)
    state = checkpoint.Checkpoint(epoch=1, params=params, momentum={}, history=[])
    checkpoint.restore(fresh, crypten.optim.SGD(fresh.parameters(), lr=0.1), state, device=torch.device("cpu"))
    restored = reveal(fresh(crypten.cryptensor(x)), to=[0], what="test restored logits")
    assert torch.allclose(restored, expected.detach(), atol=2e-3)


@pytest.mark.parametrize(
    ("layer", "message"),
    [(nn.Dropout(0.5), r"layer '1' \(Dropout\) behaves differently in training"),
     (nn.BatchNorm1d(4), r"layer '1' \(BatchNorm1d\) behaves differently in training")],
)
def test_layers_that_train_differently_are_refused(layer: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        to_crypten(nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1)))


def _factory_job(tmp_path: Path, source: str, **model: object) -> TrainJob:
    """A horizontal training job whose model is ``source``'s function ``make``."""
    (tmp_path / "factory.py").write_text("from torch import nn\n" + source)
    spec = {
        "name": "factory", "partition": "horizontal",
        "parties": [{"name": f"p{i}", "data": {"train": str(tmp_path / f"{i}.csv")}} for i in range(2)],
        "labels": {"column": "y"}, "data": {"standardize": False},
        "model": {"factory": f"{tmp_path / 'factory.py'}:make", **model},
        "training": {"epochs": 3, "batch_size": 8, "learning_rate": 0.05, "loss": "cross_entropy" if model else "bce"},
        "outputs": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_job(path)


def test_conv_bounds_hold_on_real_activations(tmp_path: Path) -> None:
    """The chain bound on the logits holds for inputs of the bounded norm (lr tiny: no growth)."""
    job = _factory_job(
        tmp_path,
        "def make():\n"
        "    return nn.Sequential(nn.Unflatten(1, (2, 5, 5)), nn.Conv2d(2, 4, 3, stride=1), nn.ReLU(),\n"
        "                         nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(16, 3))\n",
        num_classes=3,
    )
    job = job.model_copy(update={"training": job.training.model_copy(update={"learning_rate": 1e-12})})
    bounds = training_bounds(job, n_features=50, n_rows=10, input_norm=1.0)
    model = build_torch_model(job.model, n_features=50, seed=job.training.seed)
    x = torch.randn(2000, 50)
    x = x / x.norm(dim=1, keepdim=True)
    with torch.no_grad():
        worst = float(model(x).norm(dim=1).max())
    assert worst <= bounds.logit
    assert bounds.logit < 100 * worst  # a bound, not a refusal of everything


def test_branching_model_is_refused_before_sharing(tmp_path: Path) -> None:
    job = _factory_job(
        tmp_path,
        "class Res(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)\n"
        "    def forward(self, x):\n"
        "        return self.b(x + self.a(x))\n"
        "def make():\n"
        "    return Res()\n",
    )
    with pytest.raises(MpcflError, match=r"job.yaml: model.factory: .*factory.py:make: node add combines several tensors"):
        check_model(job, 4)
