"""Byte strings as int64 words: the form in which keys, nonces and digests cross gloo.

Tensors, never pickles, so a peer cannot make a process unpickle arbitrary objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on use: the launcher imports this module and needs no torch
    import torch


def to_words(data: bytes) -> torch.Tensor:
    """``data`` (a multiple of 8 bytes) as an int64 tensor, in its own memory."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()


def from_words(words: torch.Tensor) -> bytes:
    """Inverse of :func:`to_words`."""
    return words.detach().cpu().numpy().tobytes()
