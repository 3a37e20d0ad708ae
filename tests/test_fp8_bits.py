"""FP8 <-> fp32 by bit operations == torch's conversions, for every code (e4m3fn, e5m2).

Both the torch twin and the Triton helpers (under the interpreter on CPU) are checked:
decoding bit-exactly for all 256 codes (NaN codes decode to NaN, e5m2's infinities to
inf), encoding bit-exactly on values that exercise ties, subnormals and the range ends.
"""

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import DEVICE

from edgekv.kernels.fp8_bits import f32_to_fp8, float_to_fp8_bits, fp8_bits_to_float, fp8_to_f32

FLAVORS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


@triton.jit
def _decode_kernel(code_ptr, out_ptr, N: tl.constexpr, FLAVOR: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, fp8_to_f32(tl.load(code_ptr + i), FLAVOR))


@triton.jit
def _encode_kernel(x_ptr, code_ptr, n, BLOCK: tl.constexpr, FLAVOR: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(code_ptr + i, f32_to_fp8(x, FLAVOR), mask=i < n)


def _same_bits_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(a)
    return bool((nan == torch.isnan(b)).all() and torch.equal(a[~nan].view(torch.int32),
                                                               b[~nan].view(torch.int32)))


def _encode_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Every fp8 value, the midpoints between neighbours (ties), just off the midpoints,
    and random values across the whole range (subnormal to max), both signs."""
    fmax = torch.finfo(dtype).max
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    vals = vals[torch.isfinite(vals)].unique()  # sorted
    mids = (vals[1:] + vals[:-1]) / 2
    off = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20)])
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(4000, generator=g) * 36 - 20) * torch.sign(
        torch.randn(4000, generator=g))
    x = torch.cat([vals, mids, off, rand, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    return x.clamp(-fmax, fmax)


@pytest.mark.parametrize("dtype", list(FLAVORS))
def test_torch_twin_decodes_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    assert _same_bits_or_both_nan(fp8_bits_to_float(codes, dtype), codes.view(dtype).float())


@pytest.mark.parametrize("dtype", list(FLAVORS))
def test_triton_helper_decodes_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_kernel[(1,)](codes, out, N=256, FLAVOR=FLAVORS[dtype])
    assert _same_bits_or_both_nan(out.cpu(), codes.cpu().view(dtype).float())


@pytest.mark.parametrize("dtype", list(FLAVORS))
def test_torch_twin_encodes_like_torch(dtype):
    x = _encode_inputs(dtype)
    assert torch.equal(float_to_fp8_bits(x, dtype), x.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("dtype", list(FLAVORS))
def test_triton_helper_encodes_like_torch(dtype):
    x = _encode_inputs(dtype).to(DEVICE)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=DEVICE)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, codes, x.numel(), BLOCK=1024,
                                                    FLAVOR=FLAVORS[dtype])
    assert torch.equal(codes.cpu(), x.cpu().to(dtype).view(torch.uint8))
