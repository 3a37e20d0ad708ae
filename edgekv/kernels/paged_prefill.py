"""Fused paged prefill / append attention: many query tokens per sequence, causal.

Grid ``(q_tiles, S, Hkv)``. Program (i, s, kv_head) takes query tokens
``[i * BLOCK_T, (i + 1) * BLOCK_T)`` of sequence s and all ``G`` query heads of that KV
head, packed as ``BLOCK_M = BLOCK_T * G_P`` rows (row r: token ``r // G_P``, head
``r % G_P``; G_P = G rounded up to a power of two, padded heads masked), so each K/V tile
is loaded and dequantized once for G heads. It walks the sequence's KV in tiles of
``BLOCK_N`` tokens up to its last query's position (causal), dequantizing in registers
(kv_tiles.py), with an online softmax in log2 units. Programs past a sequence's query
count return at once.

Positions: query j of sequence s sits at ``L_s - n_s + j`` (its K/V already written), and
sees KV positions ``<=`` that. Tiles past the KV end and padded rows are masked in every
load (codes, scales, zeros, block-table entries).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgekv.quant import KVFormat, QuantizedKV

from .kv_tiles import attend_tile, kv_rows, load_query, softmax_init
from .launch import attention_launch, from_storage
from .launch_checks import check_paged_inputs


@triton.jit
def _paged_prefill_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, ks_ptr, kz_ptr, kd_b, kd_h, kd_t, ks_b, ks_h, ks_t,  # K store (store_args)
    v_ptr, vs_ptr, vz_ptr, vd_b, vd_h, vd_t, vs_b, vs_h, vs_t,  # V store
    table_ptr,  # (format_table) fp32: a codebook's levels
    bt_ptr, stride_bt, lens_ptr, sm_scale_log2,  # (attention_launch's args end here)
    cu_ptr, o_ptr, stride_ot, stride_oh, G, HALF,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    G_P: tl.constexpr, HALF_P: tl.constexpr,
    KIND: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, DOT: tl.constexpr,
    PRECISE: tl.constexpr, WSCALE: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // G_P
    tile = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    q_start = tl.load(cu_ptr + s).to(tl.int64)
    n = tl.load(cu_ptr + s + 1).to(tl.int64) - q_start
    if tile * BLOCK_T >= n:
        return
    L = tl.load(lens_ptr + s).to(tl.int64)

    r = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_T + r // G_P  # (M,) query index within the sequence
    g = r % G_P
    row_mask = (tok < n) & (g < G)
    qpos = L - n + tok  # (M,) its KV position
    d = tl.arange(0, HALF_P)
    d_mask = d < HALF
    mask2 = row_mask[:, None] & d_mask[None, :]
    q_off = (q_start + tok)[:, None] * stride_qt + (hk * G + g)[:, None] * stride_qh \
        + d[None, :]  # (M, HALF_P)
    q_lo, q_lo2, q_hi, q_hi2, q_sum = load_query(q_ptr, q_off, mask2, HALF, DOT, PRECISE)

    m_i, l_i, acc_lo, acc_hi = softmax_init(BLOCK_M, HALF_P)
    kv_end = L - n + tl.minimum(n, tile * BLOCK_T + BLOCK_T)  # past the tile's last query
    bt_row = bt_ptr + s * stride_bt
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < kv_end
        k_rows, k_srows, v_rows, v_srows = kv_rows(bt_row, t, t_mask, hk, kd_b, kd_h, kd_t,
                                                   ks_b, ks_h, ks_t, vd_b, vd_h, vd_t, vs_b,
                                                   vs_h, vs_t, BLOCK_SIZE)
        # causal: query row r sees positions <= qpos[r]; every row sees position 0, so
        # tile 0 gives each a finite max
        seen = t_mask[None, :] & (t[None, :] <= qpos[:, None])  # (M, N)
        m_i, l_i, acc_lo, acc_hi, _ = attend_tile(
            m_i, l_i, acc_lo, acc_hi, seen, sm_scale_log2, q_lo, q_lo2, q_hi, q_hi2, q_sum,
            k_ptr, ks_ptr, kz_ptr, k_rows, k_srows, v_ptr, vs_ptr, vz_ptr, v_rows, v_srows,
            table_ptr, d, HALF, t_mask, d_mask, KIND, OFFSET, GROUP, HAS_SCALE, HAS_ZERO,
            DOT, PRECISE, WSCALE)

    inv = 1.0 / l_i
    o_off = (q_start + tok)[:, None] * stride_ot + (hk * G + g)[:, None] * stride_oh + d[None, :]
    ety = o_ptr.dtype.element_ty
    tl.store(o_ptr + o_off, (acc_lo * inv[:, None]).to(ety), mask=mask2)
    tl.store(o_ptr + o_off + HALF, (acc_hi * inv[:, None]).to(ety), mask=mask2)


def paged_prefill_attention(
    q: torch.Tensor,             # (T, Hq, D)
    k_cache: QuantizedKV,        # data (num_blocks, Hkv, B, P); scale/zero (num_blocks, Hkv, B, NG)
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks) int32/int64
    seq_lens: torch.Tensor,      # (S,) KV length per sequence, new tokens included
    cu_seqlens_q: torch.Tensor,  # (S + 1,) query offsets into T
    fmt: KVFormat,
    sm_scale: float | None = None,
    *,
    max_q_len: int | None = None,  # longest query run; None: read from cu_seqlens_q (a sync)
    block_m: int = 64,             # query rows (tokens x G_P) per program
    block_n: int = 32,             # KV tokens per tile
    precise: bool = False,         # compensated fp16 dots: ~fp32 accuracy, ~2x the dot work
    num_warps: int | None = None,  # None: 8 for D > 64, else 4 (fewest spills, ptxas)
) -> torch.Tensor:               # (T, Hq, D) in q's dtype
    """Causal prefill attention with the fused Triton kernel; same contract as the reference.

    Each sequence's ``n_s = cu[s+1] - cu[s]`` queries are its last positions and
    ``0 < n_s <= L_s`` (or ``n_s = 0``: nothing to do). Reads the caches; writes only
    its output. Accuracy: ~1e-3 of the output scale against the fp32 reference (fp16 dot
    operands), ~1e-6 with ``precise=True`` (kv_tiles.py, "Precision").
    """
    T, Hq, D = q.shape
    S = block_tables.shape[0]
    Hkv, B = check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, fmt, num_seqs=S)
    if tuple(cu_seqlens_q.shape) != (S + 1,) or cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q must be ({S + 1},) on {q.device}, got "
                         f"{tuple(cu_seqlens_q.shape)} on {cu_seqlens_q.device}")
    out, args, consts = attention_launch(q, k_cache, v_cache, block_tables, seq_lens, fmt,
                                         sm_scale, precise)
    G = Hq // Hkv
    G_P = triton.next_power_of_2(G)
    block_m = max(block_m, G_P, 16)
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v & (v - 1) or v < 16:
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if S else 0
    grid = (triton.cdiv(max_q_len, block_m // G_P), S, Hkv)
    if T > 0 and max_q_len > 0:
        _paged_prefill_kernel[grid](
            *args, cu_seqlens_q, out, out.stride(0), out.stride(1), G, D // 2, **consts,
            BLOCK_SIZE=B, BLOCK_M=block_m, BLOCK_N=block_n, G_P=G_P,
            num_warps=num_warps or (8 if D > 64 else 4),
            num_stages=1 if consts["DOT"] == tl.float32 else 2,  # fp32 tiles: fit 99 KB of smem
        )
    out = from_storage(out, q, fmt)
    return out
