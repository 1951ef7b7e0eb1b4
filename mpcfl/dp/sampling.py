"""Poisson subsampling's public parameters: the rate and the steps per epoch, from public counts."""

from __future__ import annotations


def poisson_rate(batch_size: int, rows: int) -> float:
    """q: each row's probability of joining a step, for an expected batch of ``batch_size`` of ``rows``."""
    if rows < 1 or batch_size < 1:
        raise ValueError(f"need rows and a batch size of at least 1, got {rows} and {batch_size}")
    return min(1.0, batch_size / rows)


def poisson_steps(batch_size: int, rows: int) -> int:
    """Steps per epoch: round(1 / q), so an epoch visits each row once in expectation."""
    return max(1, round(1 / poisson_rate(batch_size, rows)))
