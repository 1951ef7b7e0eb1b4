"""Byte strings as int64 words: the form in which keys, nonces and digests cross gloo.

Tensors, never pickles, so a peer cannot make a process unpickle arbitrary objects.
"""

from __future__ import annotations

import torch


def to_words(data: bytes) -> torch.Tensor:
    """``data`` (a multiple of 8 bytes) as an int64 tensor, in its own memory."""
    return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()


def from_words(words: torch.Tensor) -> bytes:
    """Inverse of :func:`to_words`."""
    return words.detach().cpu().numpy().tobytes()
