"""Where a party's secret shares live, and the only crossings between that device and the host.

A session computes on one device, ``cpu`` or ``cuda`` (``runtime.device``). On CUDA,
CrypTen keeps each share as a ``CUDALongTensor`` (CUDA has no int64 matmul, so it
computes in float64 blocks), and a protocol multiplication refuses operands on two
devices. Hence three rules, each with one helper here:

- a party resolves its device once (:func:`mpcfl.mpc.session.session_device`, which
  calls :func:`resolve`) and passes it down explicitly: every value it shares, and the
  model, are created there, so the CPU path runs the same code as the GPU one;
- a plain int64 share coming from the host (a checkpoint) enters through
  :func:`to_device`, which wraps it as CrypTen expects on CUDA;
- a share or plaintext leaving for the host (checkpoints, saved shares, every revealed
  value) goes through :func:`to_host`, a plain CPU tensor that ``torch.save`` and
  ``torch.load(weights_only=True)`` handle and that numpy can read.

The dealer needs no GPU: it computes on the host and sends host memory, and gloo
copies it into a party's CUDA buffer (:mod:`mpcfl.mpc.providers.ttp`).
"""

from __future__ import annotations

from typing import Any

import torch

from mpcfl.errors import MpcflError

DEVICES = ("cpu", "cuda")


def resolve(name: str | torch.device) -> torch.device:
    """``cpu`` or ``cuda`` as a concrete torch device (CUDA with its index, so it compares
    equal to a tensor's ``.device``).

    Raises:
        MpcflError: an unknown device, or cuda where torch sees no GPU.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise MpcflError(f"device {str(name)!r} is not one of {', '.join(DEVICES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MpcflError("device is cuda but torch sees no GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(share: torch.Tensor, device: torch.device) -> Any:
    """A plain int64 share from the host as a share on ``device`` (a ``CUDALongTensor`` on CUDA)."""
    moved = share.to(device)
    if moved.is_cuda:
        from crypten.cuda import CUDALongTensor  # crypten is loaded: shares exist only in a session

        return CUDALongTensor(moved)
    return moved


def to_host(value: Any) -> torch.Tensor:
    """A plain CPU copy of a share or plaintext, from any device, ``CUDALongTensor`` or not.

    ``.data`` is the underlying torch tensor for both (CrypTen's wrapper has no ``detach``).
    """
    return value.data.to("cpu", copy=True)
