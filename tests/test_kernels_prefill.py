"""Fused paged prefill / append kernel == torch reference, on the same quantized blocks.

The interpreter is slow, so instead of the full cross product this covers every format
with two (GQA ratio, block size, head_dim) combinations drawn from a pairwise design (each
pair of values of any two of the three parameters appears for some format); the decode
tests run the full cross product of the shared tile code.
"""

import pytest
import torch
from kernel_cases import ALL_FORMATS, DEVICE, random_paged_kv, rel_err

from edgekv.kernels.paged_prefill import paged_prefill_attention
from edgekv.kernels.reference import paged_prefill_attention_ref
from edgekv.quant import get_format

HKV = 2
PAIRWISE = [(1, 16, 64), (1, 32, 128), (4, 16, 128), (4, 32, 64), (8, 16, 64), (8, 32, 128)]
CASES = [(name, *PAIRWISE[(2 * i + j) % len(PAIRWISE)])
         for i, name in enumerate(ALL_FORMATS) for j in range(2)]

# max |kernel - reference| / max |reference| with the default precise=False: the query and
# the probabilities enter the dot rounded to fp16 (~1e-3 measured here, with sharp
# attention). fp32 multiplies in fp32; bf16 in fp32 on CPU but in bf16 on GPUs.
TOL = {name: 3e-3 for name in ALL_FORMATS} | {"fp32": 1e-5, "bf16": 1.5e-2}
TOL_PRECISE = 2e-5


def _inputs(fmt, G, B, D, runs=None, seed=0):
    """runs: (kv_len, q_len) per sequence; default: a 1-token prompt, a whole prompt
    ending in a partial block, a short append onto one block, a long chunk onto history,
    and a sequence with no queries this step."""
    runs = runs or [(1, 1), (B - 1, B - 1), (B, 3), (3 * B + 5, 2 * B + 3), (5, 0)]
    lens = [L for L, _ in runs]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=seed)
    cu = torch.tensor([0] + [n for _, n in runs], dtype=torch.int32).cumsum(0)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(int(cu[-1]), HKV * G, D, generator=g) * 2
    sl = torch.tensor(lens, dtype=torch.int32)
    return q.to(DEVICE), k, v, bt, sl.to(DEVICE), cu.to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("name,G,B,D", CASES)
def test_prefill_matches_reference(name, G, B, D):
    fmt = get_format(name)
    q, k, v, bt, sl, cu = _inputs(fmt, G, B, D)
    # 1. reference
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    # 2. triton (64-token KV tiles span several blocks; long runs span several programs)
    out = paged_prefill_attention(q, k, v, bt, sl, cu, fmt, block_m=64, block_n=64)
    # 3. compare
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[name], name


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "fp8_e5m2", "int4_g32", "int4_nl"])
def test_prefill_precise(name):
    fmt = get_format(name)
    q, k, v, bt, sl, cu = _inputs(fmt, 4, 16, 64, seed=2)
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    out = paged_prefill_attention(q, k, v, bt, sl, cu, fmt, precise=True)
    assert rel_err(out, ref) < TOL_PRECISE


@pytest.mark.parametrize("G,D", [(3, 96), (8, 64)])
def test_prefill_gqa_packing(G, D):
    """G not a power of two (padded head rows) with head_dim 96 (padded halves), and more
    heads than a tile has tokens."""
    fmt = get_format("int8")
    q, k, v, bt, sl, cu = _inputs(fmt, G, 16, D, seed=3)
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    out = paged_prefill_attention(q, k, v, bt, sl, cu, fmt, block_m=16, block_n=16,
                                  precise=True)
    assert rel_err(out, ref) < TOL_PRECISE


def test_decode_is_prefill_with_one_query():
    from edgekv.kernels.paged_decode import paged_decode_attention

    fmt = get_format("int4")
    q, k, v, bt, sl, _ = _inputs(fmt, 4, 16, 64, runs=[(1, 1), (20, 1), (70, 1)])
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    dec = paged_decode_attention(q, k, v, bt, sl, fmt)
    pre = paged_prefill_attention(q, k, v, bt, sl, cu, fmt, precise=True)
    assert rel_err(pre, dec) < TOL_PRECISE


def test_prefill_bad_cu_seqlens():
    fmt = get_format("fp16")
    q, k, v, bt, sl, cu = _inputs(fmt, 1, 16, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k, v, bt, sl, cu[:-1], fmt)
