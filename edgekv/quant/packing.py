"""INT4 packing order, written once: both the write path and every reader use these.

Split-halves order: for a vector of head_dim codes c[0..d-1] (each 0..15), byte j holds

    low nibble  = c[j]            (dims 0 .. d/2-1)
    high nibble = c[j + d/2]      (dims d/2 .. d-1)

so ``packed & 0xF`` is the first half of the vector and ``packed >> 4`` the second half,
each contiguous. A kernel can dot the query's two halves with the two nibble planes
without interleaving registers.
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (..., d) integers in [0, 15], d even -> (..., d/2) uint8."""
    d = codes.shape[-1]
    assert d % 2 == 0, "int4 packing needs an even head_dim"
    c = codes.to(torch.uint8)
    return c[..., : d // 2] | (c[..., d // 2 :] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., d/2) uint8 -> (..., d) uint8 codes in [0, 15] (inverse of pack_int4)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)
