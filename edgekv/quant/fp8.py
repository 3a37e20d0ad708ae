"""FP8 storage (e4m3 and e5m2) with one fp16 scale per token-head.

Codes are kept as raw bytes (uint8) so that every device can hold them; readers view them
as the fp8 dtype (or decode the bits, on GPUs without native fp8). The scale maps the
vector's absolute maximum onto the format's largest finite value; values are clamped to
that finite range before the cast, which rounds to nearest even.
"""

from __future__ import annotations

import torch

from .base import KVFormat, QuantizedKV, fp16_scale


class Fp8Format(KVFormat):
    storage_dtype = torch.uint8
    has_scale = True

    def __init__(self, name: str, fp8_dtype: torch.dtype):
        self.name = name
        self.fp8_dtype = fp8_dtype
        self.fmax = float(torch.finfo(fp8_dtype).max)  # 448 (e4m3fn), 57344 (e5m2)

    def quantize(self, x: torch.Tensor) -> QuantizedKV:
        self._check_input(x)
        xf = x.float()  # (..., d)
        scale = fp16_scale(xf.abs().amax(-1, keepdim=True) / self.fmax)  # (..., 1)
        y = (xf / scale.float()).clamp(-self.fmax, self.fmax)
        codes = y.to(self.fp8_dtype).view(torch.uint8)  # (..., d)
        return QuantizedKV(data=codes, scale=scale)

    def decode(self, q: QuantizedKV) -> torch.Tensor:
        return q.data.view(self.fp8_dtype).float() * q.scale.float()
