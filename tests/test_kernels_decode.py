"""Fused paged decode kernel == torch reference, on the same quantized blocks.

Runs on CUDA when present, else on CPU under Triton's interpreter (conftest.py). The full
cross product formats x GQA ratio x block size x head_dim runs here with small shapes
(Hkv = 2); every case holds the ragged lengths 1, B-1, B and 3B+5 in one batch.
"""

import pytest
import torch
from kernel_cases import ALL_FORMATS, DEVICE, ragged_lens, random_paged_kv, rel_err

from edgekv.kernels.paged_decode import choose_num_splits, paged_decode_attention
from edgekv.kernels.reference import decode_block_mass_ref, paged_decode_attention_ref
from edgekv.quant import QuantizedKV, get_format

HKV = 2

# max |kernel - reference| / max |reference|. The kernel reads the reference's codes and
# uses compensated fp16 dots (precise=True), so only summation order differs: ~1e-6
# measured. bf16 gets more room for GPUs, where it multiplies in (compensated) bf16.
TOL = {name: 2e-5 for name in ALL_FORMATS} | {"bf16": 1e-4}


def _inputs(fmt, G, B, D, lens=None, seed=0, q_dtype=torch.float32):
    lens = ragged_lens(B) if lens is None else lens
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = (torch.randn(len(lens), HKV * G, D, generator=g) * 2).to(DEVICE, q_dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k, v, bt, sl


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_decode_matches_reference(name, G, B, D):
    fmt = get_format(name)
    q, k, v, bt, sl = _inputs(fmt, G, B, D)
    # 1. reference
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    # 2. triton: 3 splits, so the short sequences also have empty splits
    out = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=3)
    # 3. compare
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[name], name


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "fp8", "int4_g32"])
def test_decode_single_split_writes_output_directly(name):
    fmt = get_format(name)
    q, k, v, bt, sl = _inputs(fmt, 4, 16, 64, seed=3)
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    out = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=1)
    assert rel_err(out, ref) < TOL[name]


def test_more_splits_than_blocks():
    """Every sequence has empty splits; they must merge as nothing."""
    fmt = get_format("int8")
    q, k, v, bt, sl = _inputs(fmt, 4, 16, 64, lens=[1, 7, 20])
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    out = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=8, block_n=16)
    assert rel_err(out, ref) < TOL["int8"]


@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_single_sequence_of_length_one(name):
    fmt = get_format(name)
    q, k, v, bt, sl = _inputs(fmt, 8, 16, 64, lens=[1])
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    assert rel_err(paged_decode_attention(q, k, v, bt, sl, fmt), ref) < TOL[name]
    # one token: the output is that token's value, whatever the scores
    G = q.shape[1] // HKV
    b0 = bt[0, 0].long()
    first = QuantizedKV(v.data[b0, :, 0], None if v.scale is None else v.scale[b0, :, 0],
                        None if v.zero is None else v.zero[b0, :, 0])
    v1 = fmt.dequantize(first)  # (Hkv, D)
    assert torch.allclose(ref[0], v1.repeat_interleave(G, 0), atol=1e-5)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fp16", "int4_norot"])
def test_half_precision_queries(name, q_dtype):
    fmt = get_format(name)
    q, k, v, bt, sl = _inputs(fmt, 4, 16, 64, q_dtype=q_dtype)
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    out = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=2)
    assert out.dtype == q_dtype
    assert rel_err(out, ref) < 1e-2  # both round the same fp32 result to q's dtype


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("name", ["fp16", "int4", "fp8"])
def test_block_mass(name, num_splits):
    """mass[s, b]: probability received by block b of sequence s, summed over Hq heads."""
    fmt = get_format(name)
    G, B = 4, 16
    q, k, v, bt, sl = _inputs(fmt, G, B, 64, seed=5)
    out, mass = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=num_splits,
                                       return_block_mass=True)
    ref_mass = decode_block_mass_ref(q, k, bt, sl, fmt)
    assert mass.shape == bt.shape and mass.dtype == torch.float32
    torch.testing.assert_close(mass.sum(1), torch.full_like(mass[:, 0], HKV * G))
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    used = -(-sl.long() // B)  # blocks past a sequence's end receive nothing
    assert all((mass[s, n:] == 0).all() for s, n in enumerate(used.tolist()))
    assert rel_err(out, paged_decode_attention_ref(q, k, v, bt, sl, fmt)) < TOL[name]


def test_block_mass_with_large_blocks_and_default_tiles():
    fmt = get_format("int8")
    q, k, v, bt, sl = _inputs(fmt, 2, 32, 64, lens=[40, 100], seed=6)
    _, mass = paged_decode_attention(q, k, v, bt, sl, fmt, return_block_mass=True)
    torch.testing.assert_close(mass, decode_block_mass_ref(q, k, bt, sl, fmt), atol=1e-5,
                               rtol=1e-4)


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 128 * 1024, num_sms=132) == 32  # batch 1, long: split
    assert choose_num_splits(64, 8, 128 * 1024, num_sms=132) == 1  # enough programs already
    assert choose_num_splits(1, 8, 100, num_sms=132) == 1  # too short to be worth it
    assert choose_num_splits(1, 8, 4096, num_sms=132) == 16  # >= 256 tokens per split


def test_bad_inputs_raise_value_error():
    fmt = get_format("int8")
    q, k, v, bt, sl = _inputs(fmt, 4, 16, 64)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q[:, :7], k, v, bt, sl, fmt)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q, k, v, bt, sl, get_format("fp16"))
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, k, v, bt, sl[:2], fmt)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=0)


def test_offsets_past_int32(tmp_path):
    """Blocks whose element offset exceeds 2**31: the kernels must index in int64.

    On CPU the cache is a private mapping of a sparse file, so only touched pages cost
    memory; on CUDA the test needs ~2.3 GB free.
    """
    from edgekv.kernels.paged_prefill import paged_prefill_attention
    from edgekv.kernels.quant_write import write_kv_triton
    from edgekv.kernels.reference import paged_prefill_attention_ref, write_kv_ref

    fmt, B, D, hkv, nb = get_format("int8_norot"), 16, 64, 1, 2_200_000
    n_el = nb * hkv * B * D  # 2.25e9 > 2**31
    if DEVICE.type == "cuda":
        if torch.cuda.mem_get_info()[0] < 3 * n_el:
            pytest.skip("needs ~2.3 GB of free GPU memory")
        data = [torch.zeros(nb, hkv, B, D, dtype=torch.int8, device=DEVICE) for _ in range(2)]
    else:
        path = tmp_path / "sparse.bin"
        with open(path, "wb") as f:
            f.truncate(n_el)
        data = [torch.from_file(str(path), shared=False, size=n_el, dtype=torch.int8)
                .view(nb, hkv, B, D) for _ in range(2)]
    stores = [QuantizedKV(d, torch.ones(nb, hkv, B, 1, dtype=torch.float16, device=DEVICE))
              for d in data]
    table = torch.tensor([[nb - 1, 5, nb - 40_000]], dtype=torch.int32, device=DEVICE)
    L = 2 * B + 9
    pos = torch.arange(L, device=DEVICE)
    slots = table[0, pos // B].long() * B + pos % B
    g = torch.Generator().manual_seed(0)
    kx, vx = (torch.randn(L, hkv, D, generator=g).to(DEVICE) for _ in range(2))
    write_kv_triton(stores[0], stores[1], kx, vx, slots, fmt)
    q = torch.randn(1, 4, D, generator=g).to(DEVICE)
    sl = torch.tensor([L], dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q, stores[0], stores[1], table, sl, fmt)
    assert rel_err(paged_decode_attention(q, stores[0], stores[1], table, sl, fmt,
                                          num_splits=2), ref) < TOL["int8"]
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    qp = torch.randn(5, 4, D, generator=g).to(DEVICE)
    ref = paged_prefill_attention_ref(qp, stores[0], stores[1], table, sl, cu, fmt)
    out = paged_prefill_attention(qp, stores[0], stores[1], table, sl, cu, fmt, precise=True)
    assert rel_err(out, ref) < TOL["int8"]
    # the written codes equal the reference write's
    copy = [QuantizedKV(s.data[table[0].long()].clone(), s.scale[table[0].long()].clone())
            for s in stores]
    blk_local = torch.arange(3, device=DEVICE)[pos // B]
    small = [QuantizedKV(torch.zeros_like(s.data), torch.ones_like(s.scale)) for s in copy]
    write_kv_ref(small[0], small[1], kx, vx, blk_local * B + pos % B, fmt)
    for c, s in zip(copy, small, strict=True):
        assert (c.data.int() - s.data.int()).abs().max() <= 1
        torch.testing.assert_close(c.scale, s.scale, rtol=1e-3, atol=0)


@pytest.mark.parametrize("heads_per_program", [1, 2, 16])
def test_lse_merge_heads_per_program(heads_per_program):
    """The merge kernel's GPU layout (1 head per program) and its CPU one agree."""
    from edgekv.kernels.lse_merge import lse_merge

    g = torch.Generator().manual_seed(0)
    S, Hq, ns, D = 2, 6, 3, 64
    acc = torch.randn(S, Hq, ns, D, generator=g)
    m = torch.randn(S, Hq, ns, generator=g) * 4
    m[0, :, 2] = float("-inf")  # an empty split
    l = torch.rand(S, Hq, ns, generator=g) + 0.5
    l[0, :, 2] = 0.0
    out = torch.empty(S, Hq, D)
    lse2 = torch.empty(S, Hq)
    args = [t.to(DEVICE) for t in (acc, m, l, out, lse2)]
    lse_merge(*args, heads_per_program=heads_per_program)
    w = torch.exp2(m - m.amax(-1, keepdim=True))  # (S, Hq, ns)
    want = (w[..., None] * acc).sum(2) / (w * l).sum(-1, keepdim=True)
    torch.testing.assert_close(args[3].cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[4].cpu(), m.amax(-1) + torch.log2((w * l).sum(-1)))


@pytest.mark.parametrize("name", ["fp16", "int8", "int4"])
def test_odd_shapes(name):
    """GQA ratio 3 (padded head rows), head_dim 96 (padded channel halves), int64 tables
    and lengths, and a query that is a strided view (as split from a fused QKV output)."""
    fmt = get_format(name)
    G, B, D, lens = 3, 16, 96, [1, 15, 40]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=8)
    qkv = torch.randn(len(lens), 3 * HKV * G, D, generator=torch.Generator().manual_seed(9))
    q = qkv.to(DEVICE)[:, : HKV * G]  # (S, Hq, D), batch stride 3 * Hq * D
    sl = torch.tensor(lens, device=DEVICE)  # int64
    ref = paged_decode_attention_ref(q, k, v, bt.long(), sl, fmt)
    out = paged_decode_attention(q, k, v, bt.long(), sl, fmt, num_splits=2)
    assert rel_err(out, ref) < TOL[name]


def test_group_size_must_fit_half_head_dim():
    """Scale groups must tile each head-dim half (the torch path takes the rest)."""
    from edgekv.kernels.kv_tiles import UnsupportedFormat, kernel_format

    assert kernel_format(get_format("int4_g32"), 64).group == 32
    with pytest.raises(UnsupportedFormat, match="group size"):
        kernel_format(get_format("int4_g32"), 96)  # halves of 48 channels
    with pytest.raises(UnsupportedFormat, match="even head_dim"):
        kernel_format(get_format("fp16"), 63)
    from edgekv.quant import IntFormat
    with pytest.raises(UnsupportedFormat, match="16-channel tile"):  # groups of 8, halves of 8
        kernel_format(IntFormat("int4_g8", bits=4, symmetric=False, group_size=8), 16)
    assert kernel_format(get_format("int4_nl"), 32).group == 16  # halves of 16: one group


@pytest.mark.parametrize("name", ["int4", "fp8_e5m2", "int4_nl"])
def test_decode_without_compensation(name):
    """precise=False: plain fp16 dot operands, ~1e-3 of the output scale."""
    fmt = get_format(name)
    q, k, v, bt, sl = _inputs(fmt, 4, 16, 128, seed=11)
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    out = paged_decode_attention(q, k, v, bt, sl, fmt, num_splits=2, precise=False)
    assert rel_err(out, ref) < 3e-3


def test_the_kernels_take_every_format():
    """Every registered format runs in the kernels; a codebook with one scale per
    token-head is refused with UnsupportedFormat (dispatch falls back), never misread."""
    from edgekv.kernels.kv_tiles import UnsupportedFormat, kernel_format
    from edgekv.quant import CodebookFormat

    for name in ALL_FORMATS:
        kernel_format(get_format(name), 128)
    with pytest.raises(UnsupportedFormat, match="group scales"):
        kernel_format(CodebookFormat("nl_per_token", group_size=None), 128)
