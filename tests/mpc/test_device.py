"""The session's device and the crossings to and from the host, checked on the CPU.

The GPU half of these paths runs in tests/tasks/test_cuda.py (skipped without a GPU);
here CrypTen's CUDA share wrapper is built around a host tensor, which is enough to
check that nothing that leaves for disk or numpy keeps the wrapper.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mpcfl.errors import MpcflError
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.device import resolve, to_device, to_host


def test_resolve_names_a_concrete_device() -> None:
    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(MpcflError, match="device 'tpu' is not one of cpu, cuda"):
        resolve("tpu")
    if torch.cuda.is_available():
        assert resolve("cuda") == torch.zeros(1, device="cuda").device  # with its index, as tensors report it
    else:
        with pytest.raises(MpcflError, match="device is cuda but torch sees no GPU"):
            resolve("cuda")


def _cuda_long_tensor_around(tensor: torch.Tensor):  # noqa: ANN202 (crypten's type)
    """CrypTen's CUDA share wrapper, holding a host tensor (no GPU needed to build it this way)."""
    import_crypten()  # first: it makes crypten importable on this torch
    from crypten.cuda import CUDALongTensor

    wrapped = CUDALongTensor()
    wrapped._tensor = tensor
    return wrapped


def test_to_host_gives_a_plain_cpu_copy_that_loads_safely() -> None:
    share = torch.tensor([1, -2, 2**62], dtype=torch.long)
    for value in (share, _cuda_long_tensor_around(share)):
        host = to_host(value)
        assert type(host) is torch.Tensor and host.device.type == "cpu" and torch.equal(host, share)
        assert host.data_ptr() != share.data_ptr()  # a copy: the saved share does not move with training
        buffer = io.BytesIO()
        torch.save({"shares": {"w": host}}, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=True)["shares"]["w"], share)
    # The wrapper itself would not load back under weights_only (crypten's CUDA tests never saved one).
    buffer = io.BytesIO()
    torch.save(_cuda_long_tensor_around(share), buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="CUDALongTensor"):
        torch.load(buffer, weights_only=True)
    assert to_host(torch.tensor([0.5, 1.5])).numpy().tolist() == [0.5, 1.5]  # revealed values: numpy reads them


def test_to_device_on_the_cpu_is_the_plain_share() -> None:
    share = torch.arange(4)
    moved = to_device(share, torch.device("cpu"))
    assert type(moved) is torch.Tensor and torch.equal(moved, share)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.cuda.is_available() is false)")
def test_to_device_on_cuda_wraps_the_share_as_crypten_expects() -> None:
    import_crypten()
    from crypten.cuda import CUDALongTensor

    moved = to_device(torch.arange(6).reshape(2, 3), resolve("cuda"))
    assert isinstance(moved, CUDALongTensor) and moved.is_cuda
    product = torch.matmul(moved, to_device(torch.ones(3, 1, dtype=torch.long), resolve("cuda")))  # int64 matmul
    assert torch.equal(to_host(product), torch.tensor([[3], [12]]))


@pytest.mark.parametrize("classes", [2, 3])
def test_plain_sgd_gives_the_gradient_of_the_mean_loss(crypten_single: None, classes: int) -> None:
    """PlainSgd pushes the head's (p - y) / B back through the model: torch's gradient of the mean loss."""
    from mpcfl.models.build import build_torch_model, to_crypten
    from mpcfl.models.heads import head_of
    from mpcfl.models.spec import ModelSpec
    from mpcfl.mpc.reveal import reveal
    from mpcfl.tasks.train.steps import PlainSgd

    crypten = import_crypten()
    spec = ModelSpec(type="mlp", hidden=[5], num_classes=classes)
    head = head_of(spec)
    torch_model = build_torch_model(spec, n_features=4, seed=0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    labels = np.arange(16) % classes
    head.plain_loss(torch_model(x), head.plain_targets(labels)).backward()
    model = to_crypten(torch_model).encrypt(src=0).to(torch.device("cpu"))
    model.train()
    PlainSgd(head).step(model, torch_model, crypten.cryptensor(x), crypten.cryptensor(head.secure_targets(labels, 16)))
    for name, param in model.named_parameters():
        grad = reveal(param.grad, to=[0], what=name)
        expected = dict(torch_model.named_parameters())[name].grad
        assert torch.allclose(grad, expected, atol=3e-3), (name, grad, expected)
