"""Integer storage (int8, int4) with fp16 scales per token-head or per group of channels.

Symmetric:   code = round(x / s) clamped to [-qmax, qmax],  x ~ code * s,  s = absmax / qmax
Asymmetric:  code = round((x - z) / s) clamped to [0, 2^bits - 1],  x ~ code * s + z,
             s = (max - min) / (2^bits - 1), z = min
Codes are computed from the *stored* (fp16-rounded) scale and zero, so dequantization is
exactly consistent with what was written. Rounding is to nearest (ties to even), never
truncation. INT4 codes are stored as unsigned nibbles (symmetric codes offset by 8) in the
order of ``packing.py``. A rotating format quantizes ``x @ R`` (``hadamard.py``).
"""

from __future__ import annotations

import torch

from .base import GroupedFormat, QuantizedKV, fp16_scale
from .packing import pack_int4, unpack_int4


class IntFormat(GroupedFormat):
    def __init__(
        self,
        name: str,
        bits: int,
        symmetric: bool = True,
        group_size: int | None = None,  # None: one group per token-head
        rotate: bool = False,
    ):
        assert bits in (4, 8)
        self.name = name
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size
        self.rotate = rotate
        self.has_scale = True
        self.has_zero = not symmetric
        # int8 symmetric codes are signed; asymmetric codes and int4 nibbles are unsigned
        self.storage_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
        self.qmax = 2 ** (bits - 1) - 1  # symmetric code range [-qmax, qmax]
        self.levels = 2**bits - 1  # asymmetric code range [0, levels]
        self.offset = 8 if bits == 4 and symmetric else 0  # int4 symmetric nibble = code + 8

    # ---- shape rules -------------------------------------------------------------------
    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if self.bits == 4 and head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even to pack two int4 codes "
                             f"per byte, got {head_dim}")

    def packed_dim(self, head_dim: int) -> int:
        self.check_head_dim(head_dim)
        return head_dim // 2 if self.bits == 4 else head_dim

    # ---- quantize / decode (num_groups, the basis, quantize: GroupedFormat) ------------
    def quantize_storage(self, xf: torch.Tensor) -> QuantizedKV:
        d = xf.shape[-1]
        g = self.num_groups(d)
        xg = xf.reshape(*xf.shape[:-1], g, d // g)  # (..., groups, group_size)
        if self.symmetric:
            scale = fp16_scale(xg.abs().amax(-1) / self.qmax)  # (..., groups)
            codes = torch.round(xg / scale.float().unsqueeze(-1)).clamp(-self.qmax, self.qmax)
            zero = None
        else:
            lo, hi = torch.aminmax(xg, dim=-1)  # one pass (the same values as amin, amax)
            scale = fp16_scale((hi - lo) / self.levels)
            zero = lo.to(scale.dtype)
            codes = torch.round((xg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1))
            codes = codes.clamp(0, self.levels)
        codes = codes.reshape(xf.shape)  # (..., d)
        if self.bits == 8:
            data = codes.to(self.storage_dtype)
        else:
            data = pack_int4((codes + self.offset if self.offset else codes).to(torch.uint8))
        return QuantizedKV(data=data, scale=scale, zero=zero)

    def decode(self, q: QuantizedKV) -> torch.Tensor:
        if self.bits == 8:
            codes = q.data.float()
        else:
            codes = unpack_int4(q.data).float() - self.offset  # (..., d)
        d = codes.shape[-1]
        g = q.scale.shape[-1]
        cg = codes.reshape(*codes.shape[:-1], g, d // g)
        x = cg * q.scale.float().unsqueeze(-1)
        if q.zero is not None:
            x = x + q.zero.float().unsqueeze(-1)
        return x.reshape(codes.shape)
