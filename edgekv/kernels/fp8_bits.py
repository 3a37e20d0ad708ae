"""FP8 (e4m3fn, e5m2) <-> fp32 with integer bit operations: Triton helpers and torch twins.

Native fp8 casts exist in Triton only for some targets (``fp8e4nv`` needs compute capability
>= 8.9), so the kernels decode and encode the bytes themselves. Both directions are exact:

decode   e5m2 is the top byte of an fp16, so ``code << 8`` bit-cast to fp16 is its value.
         e4m3fn has one exponent bit less: ``sign << 15 | (code & 0x7F) << 7`` read as fp16
         is the value times 2**-8 (subnormals included), so multiply by 256 in fp32.
         NaN codes (e4m3fn: 0x7F, 0xFF; e5m2: exponent all ones, mantissa != 0) give NaN,
         e5m2's 0x7C / 0xFC give +-inf.
encode   round to nearest even, the input already clamped to the format's finite range
         (as ``Fp8Format.quantize`` does). Normal results round the fp32 bits with the usual
         ``+ 0x7FF.. + lsb`` trick; results below the smallest normal are rounded by one fp32
         addition of a power of two whose ulp is the fp8 subnormal step.

    MANT = mantissa bits (e4m3fn: 3, e5m2: 2)   BIAS = exponent bias (7, 15)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3 = tl.constexpr(0)  # torch.float8_e4m3fn
E5M2 = tl.constexpr(1)  # torch.float8_e5m2

_PARAMS = {torch.float8_e4m3fn: (3, 7), torch.float8_e5m2: (2, 15)}  # (MANT, BIAS)


# ---- Triton ------------------------------------------------------------------------------
@triton.jit
def fp8_to_f32(code, FLAVOR: tl.constexpr):
    """uint8 codes (any shape) -> fp32 values. FLAVOR: E4M3 or E5M2."""
    c = code.to(tl.uint16)
    if FLAVOR == E5M2:
        return (c << 8).to(tl.float16, bitcast=True).to(tl.float32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    x = bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((c & 0x7F) == 0x7F, float("nan"), x)


@triton.jit
def f32_to_fp8(x, FLAVOR: tl.constexpr):
    """fp32 values within the format's finite range (any shape) -> uint8 codes, RNE."""
    if FLAVOR == E5M2:
        MANT: tl.constexpr = 2
        BIAS: tl.constexpr = 15
    else:
        MANT: tl.constexpr = 3
        BIAS: tl.constexpr = 7
    SHIFT: tl.constexpr = 23 - MANT
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF  # |x| bits
    # normal: round away the low SHIFT mantissa bits (ties to even), then re-bias
    rounded = a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)
    normal = (rounded >> SHIFT) - ((127 - BIAS) << MANT)
    # subnormal: |x| + 2**(24 - BIAS - MANT) has an ulp of one fp8 subnormal step
    magic_bits: tl.constexpr = (151 - BIAS - MANT) << 23
    magic = tl.full(x.shape, magic_bits, tl.int32).to(tl.float32, bitcast=True)
    ax = a.to(tl.float32, bitcast=True)
    sub = (ax + magic).to(tl.int32, bitcast=True) - magic_bits
    code = tl.where(a < ((128 - BIAS) << 23), sub, normal)  # below 2**(1 - BIAS): subnormal
    return (code | sign).to(tl.uint8)


# ---- torch twins (same algorithm; tests and CPU tools) ------------------------------------
def fp8_bits_to_float(codes: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """uint8 codes (any shape) -> fp32, bit-exact with ``codes.view(fp8_dtype).float()``."""
    assert codes.dtype == torch.uint8 and fp8_dtype in _PARAMS
    c = codes.to(torch.int32)
    if fp8_dtype == torch.float8_e5m2:
        return (c << 8).to(torch.int16).view(torch.float16).float()
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)  # (...) int32, < 2**16
    x = bits.to(torch.uint16).view(torch.float16).float() * 256.0
    return torch.where((c & 0x7F) == 0x7F, torch.full_like(x, float("nan")), x)


def float_to_fp8_bits(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fp32 values within the finite range -> uint8 codes, equal to ``x.to(fp8_dtype)`` bits."""
    assert fp8_dtype in _PARAMS
    mant, bias = _PARAMS[fp8_dtype]
    shift = 23 - mant
    u = x.float().contiguous().view(torch.int32)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    rounded = a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)
    normal = (rounded >> shift) - ((127 - bias) << mant)
    magic_bits = (151 - bias - mant) << 23
    magic = torch.tensor(magic_bits, dtype=torch.int32).view(torch.float32).item()
    sub = (a.view(torch.float32) + magic).view(torch.int32) - magic_bits
    code = torch.where(a < ((128 - bias) << 23), sub, normal)
    return (code | sign).to(torch.uint8)
