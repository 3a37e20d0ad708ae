"""Orthogonal Hadamard rotation of head_dim, used by rotating formats.

A rotation spreads the energy of a few outlier channels (real keys have them) over all
channels, so one per-vector scale fits every value well. ``R`` is block-diagonal with
normalised Sylvester-Hadamard blocks of the largest power of two dividing head_dim (the
whole head for 64 or 128). It is symmetric and orthogonal: ``R @ R = I``, so the same
matrix rotates and un-rotates.
"""

from __future__ import annotations

import functools

import torch


def hadamard_block_size(head_dim: int) -> int:
    """Largest power of two dividing head_dim (1 means no rotation is possible)."""
    return head_dim & -head_dim


@functools.lru_cache(maxsize=32)
def hadamard_matrix(head_dim: int, device: str = "cpu") -> torch.Tensor:
    """(head_dim, head_dim) fp32 orthogonal, symmetric rotation matrix."""
    n = hadamard_block_size(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / n**0.5
    r = torch.block_diag(*([h] * (head_dim // n)))
    return r.to(device=device, dtype=torch.float32)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) -> x @ R in fp32. R is its own inverse, so this also un-rotates."""
    r = hadamard_matrix(x.shape[-1], str(x.device))
    return x.float() @ r
