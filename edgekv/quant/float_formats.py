"""Plain floating-point storage: fp32 (exact reference), fp16, bf16. No scales."""

from __future__ import annotations

import torch

from .base import KVFormat, QuantizedKV


class FloatFormat(KVFormat):
    """Stores values cast to ``dtype``; values beyond its finite range are clamped, not inf."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.storage_dtype = dtype

    def quantize(self, x: torch.Tensor) -> QuantizedKV:
        self._check_input(x)
        fmax = torch.finfo(self.storage_dtype).max
        return QuantizedKV(data=x.float().clamp(-fmax, fmax).to(self.storage_dtype))

    def decode(self, q: QuantizedKV) -> torch.Tensor:
        return q.data.float()
