"""Every supported layer, run under MPC (one process, world size 1), against plaintext torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpcfl.mpc.engine import import_crypten
from mpcfl.models.convert import UnsupportedModelError, encrypt_model, trace
from mpcfl.mpc.reveal import reveal

# Fixed point keeps 16 fractional bits; linear layers stay within ~1e-3, the
# iterative approximations (sigmoid, tanh, softmax, log) within these bounds.
EXACT = 5e-3
APPROX = 3e-2


class Residual(nn.Module):
    """A small ResNet basic block: conv-bn-relu-conv-bn plus the identity, then relu."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Residual(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        return self.head(x.view(x.size(0), -1))


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 4)), (5, 6), EXACT),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1)), (4, 2, 9), EXACT),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()), (2, 2, 6, 6), EXACT),
    "maxpool": (lambda: nn.Sequential(nn.MaxPool2d(2)), (2, 3, 6, 6), EXACT),
    "avgpool": (lambda: nn.Sequential(nn.AvgPool2d(2, stride=2)), (2, 3, 6, 6), EXACT),
    "adaptive_avgpool": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d((2, 2))), (2, 3, 6, 6), EXACT),
    "batchnorm1d": (lambda: _randomise_batchnorm(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))), (6, 5), EXACT),
    "batchnorm2d": (lambda: _randomise_batchnorm(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))), (2, 1, 5, 5), EXACT),
    "flatten_dropout": (lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 2)), (3, 3, 2, 2), EXACT),
    "sigmoid": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), (5, 4), APPROX),
    "tanh": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()), (5, 4), APPROX),
    "softmax": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1)), (5, 4), APPROX),
    "log_softmax": (lambda: nn.Sequential(nn.Linear(4, 5), nn.LogSoftmax(dim=1)), (5, 4), APPROX),
    "relu_then_maxpool": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1)), (2, 1, 7, 7), EXACT),
    "resnet_block": (lambda: _randomise_batchnorm(TinyResNet()), (2, 1, 8, 8), EXACT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_plaintext(crypten_single: None, case: str) -> None:
    make, shape, tolerance = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    crypten = import_crypten()
    secure = encrypt_model(trace(model), src=0)
    out = reveal(secure(crypten.cryptensor(x, src=0)), to=[0], what=f"test {case}")
    with torch.no_grad():
        expected = model(x)
    assert out.shape == expected.shape
    error = (out - expected).abs().max().item()
    assert error < tolerance, f"{case}: max abs error {error:.2e}"


def test_training_mode_models_are_evaluated_in_eval_mode(crypten_single: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9)).train()
    x = torch.randn(3, 4)
    crypten = import_crypten()
    out = reveal(encrypt_model(trace(model), src=0)(crypten.cryptensor(x)), to=[0], what="test dropout")
    assert torch.allclose(out, model.eval()(x).detach(), atol=EXACT)


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 4), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class UsesFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Unknown(), r"layer 'features.1' \(ELU\) is not supported under MPC"),
        (UsesFunction(), r"function 'erf' \(node erf\) is not supported under MPC"),
        (Branchy(), r"Branchy cannot be traced with torch.fx"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")), r"Conv2d with padding='same'"),
        (nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), r"without running statistics"),
    ],
)
def test_unsupported_models_are_refused_by_name(model: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        trace(model)


def test_relu_before_max_pool_is_reordered_exactly() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(torch.relu(self.conv(x))) + 1

    torch.manual_seed(0)
    model = Functional().eval()
    gm = trace(model)
    order = [n.target for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert order[:3] == ["conv", "pool", torch.relu]
    x = torch.randn(4, 1, 9, 9)
    assert torch.equal(gm(x), model(x))
