"""Fused paged decode attention: one query token per sequence over its quantized blocks.

Grid ``(S, Hkv, NSPLIT)``. Program (s, kv_head, split) reads the KV of one KV head for one
slice of sequence s, once, for all ``G = Hq / Hkv`` query heads that share it (GQA): the
G query rows (padded to ``G_P >= 16`` for tl.dot) are the M side of the dots. It walks its
slice in tiles of ``BLOCK_N`` tokens, gathering each token's block id from the block table
(so a tile may span several blocks, or part of one), loads codes and fp16 scales of the
tile, dequantizes in registers (kv_tiles.py) and keeps an online softmax in log2 units.

Flash-decoding. The KV length is split into ``NSPLIT`` slices of whole tiles so that batch
1 at long context still fills the GPU; slices are per sequence (``ceil(tiles / NSPLIT)``
tiles each), so a short sequence has empty slices, which are cheap and merge as nothing.
With ``NSPLIT == 1`` the kernel normalises and writes the output itself; otherwise it
writes partials that ``lse_merge.py`` reduces. ``choose_num_splits`` is the heuristic.

Block mass (``RETURN_MASS``). Per (head, block) the kernel stores the unnormalised mass
``sum 2**(s - m)`` with the running max ``m`` it was taken at (tiles hold whole blocks);
the launcher normalises with the final log-sum-exp and sums over query heads.

Masking. Tokens at or past the slice end (partial last block, padded tile) are masked in
the loads of codes, scales, zeros and block-table entries, and their scores are -inf.
Offsets into the cache are int64: ``block_id * block_stride`` passes 2**31 on big caches.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from edgekv.quant import KVFormat, QuantizedKV

from .kv_tiles import attend_tile, kv_rows, load_query, softmax_init
from .launch import attention_launch, from_storage
from .launch_checks import check_paged_inputs
from .lse_merge import lse_merge


@triton.jit
def _paged_decode_kernel(
    q_ptr, stride_qs, stride_qh,
    k_ptr, ks_ptr, kz_ptr, kd_b, kd_h, kd_t, ks_b, ks_h, ks_t,  # K store (store_args)
    v_ptr, vs_ptr, vz_ptr, vd_b, vd_h, vd_t, vs_b, vs_h, vs_t,  # V store
    table_ptr,  # (format_table) fp32: a codebook's levels
    bt_ptr, stride_bt, lens_ptr, sm_scale_log2,  # (attention_launch's args end here)
    o_ptr, m_ptr, l_ptr,  # partials (NSPLIT > 1) or out / lse2 / unused (DIRECT)
    stride_os, stride_oh,
    mass_ptr, mref_ptr,   # (S, Hq, MAX_BLOCKS) fp32 (RETURN_MASS)
    num_splits, HQ, G, HALF, MAX_BLOCKS,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, G_P: tl.constexpr, HALF_P: tl.constexpr,
    KIND: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, DOT: tl.constexpr, PRECISE: tl.constexpr,
    WSCALE: tl.constexpr, DIRECT: tl.constexpr, RETURN_MASS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(lens_ptr + s)
    tiles_per_split = tl.cdiv(tl.cdiv(L, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, L)

    g = tl.arange(0, G_P)
    g_mask = g < G
    heads = hk * G + g  # (G_P,) query heads of this KV head
    d = tl.arange(0, HALF_P)
    d_mask = d < HALF
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_off = s * stride_qs + heads[:, None] * stride_qh + d[None, :]  # (G_P, HALF_P)
    q_lo, q_lo2, q_hi, q_hi2, q_sum = load_query(q_ptr, q_off, q_mask, HALF, DOT, PRECISE)

    m_i, l_i, acc_lo, acc_hi = softmax_init(G_P, HALF_P)
    bt_row = bt_ptr + s * stride_bt
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        k_rows, k_srows, v_rows, v_srows = kv_rows(bt_row, t, t_mask, hk, kd_b, kd_h, kd_t,
                                                   ks_b, ks_h, ks_t, vd_b, vd_h, vd_t, vs_b,
                                                   vs_h, vs_t, BLOCK_SIZE)
        # decode: the one query is the last position, it sees every stored token
        m_i, l_i, acc_lo, acc_hi, p = attend_tile(
            m_i, l_i, acc_lo, acc_hi, t_mask[None, :], sm_scale_log2, q_lo, q_lo2, q_hi,
            q_hi2, q_sum, k_ptr, ks_ptr, kz_ptr, k_rows, k_srows, v_ptr, vs_ptr, vz_ptr,
            v_rows, v_srows, table_ptr, d, HALF, t_mask, d_mask, KIND, OFFSET, GROUP,
            HAS_SCALE, HAS_ZERO, DOT, PRECISE, WSCALE)
        if RETURN_MASS:  # unnormalised mass per block, with the max it is relative to
            NBT: tl.constexpr = BLOCK_N // BLOCK_SIZE
            pb = tl.sum(tl.reshape(p, (G_P, NBT, BLOCK_SIZE)), axis=2)  # (G_P, NBT)
            bidx = t0 // BLOCK_SIZE + tl.arange(0, NBT)
            bmask = g_mask[:, None] & (bidx * BLOCK_SIZE < end)[None, :]
            moff = (s * HQ + heads)[:, None] * MAX_BLOCKS + bidx[None, :]
            tl.store(mass_ptr + moff, pb, mask=bmask)
            tl.store(mref_ptr + moff, tl.broadcast_to(m_i[:, None], (G_P, NBT)), mask=bmask)

    o_off = s * stride_os + heads[:, None] * stride_oh + split * (2 * HALF) + d[None, :]
    ml_off = (s * HQ + heads) * num_splits + split  # (G_P,)
    if DIRECT:
        inv = 1.0 / tl.where(l_i > 0, l_i, float("inf"))  # no KV at all: output 0
        ety = o_ptr.dtype.element_ty
        tl.store(o_ptr + o_off, (acc_lo * inv[:, None]).to(ety), mask=q_mask)
        tl.store(o_ptr + o_off + HALF, (acc_hi * inv[:, None]).to(ety), mask=q_mask)
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))  # m_i is -inf if l_i is 0
        tl.store(m_ptr + ml_off, lse, mask=g_mask)
    else:
        tl.store(o_ptr + o_off, acc_lo, mask=q_mask)
        tl.store(o_ptr + o_off + HALF, acc_hi, mask=q_mask)
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the CPU interpreter runs programs one after another
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_tokens_per_split: int = 256, max_splits: int = 32) -> int:
    """Splits so that ``batch * num_kv_heads * splits`` covers about two waves of SMs,
    without slices shorter than ``min_tokens_per_split`` (their fixed cost would dominate).
    """
    want = triton.cdiv(2 * num_sms, max(1, batch * num_kv_heads))
    cap = triton.cdiv(max(1, max_seq_len), min_tokens_per_split)
    return max(1, min(want, cap, max_splits))


def paged_decode_attention(
    q: torch.Tensor,             # (S, Hq, D)
    k_cache: QuantizedKV,        # data (num_blocks, Hkv, B, P); scale/zero (num_blocks, Hkv, B, NG)
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks) int32/int64
    seq_lens: torch.Tensor,      # (S,) int32/int64, KV length with the new token
    fmt: KVFormat,
    sm_scale: float | None = None,
    *,
    num_splits: int | None = None,    # None: choose_num_splits
    max_seq_len: int | None = None,   # bound used by the heuristic; None: max_blocks * B
    return_block_mass: bool = False,
    block_n: int | None = None,       # tokens per tile; None: 32 (D > 64) or 64, >= B with mass
    precise: bool = True,             # compensated fp16 dots (kv_tiles._mm): ~fp32 accuracy
    num_warps: int = 4,
    return_lse: bool = False,         # also the (S, Hq) fp32 log2-sum-exp of the scores
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with the fused Triton kernel; same contract as the reference.

    Returns out (S, Hq, D) in q's dtype; with ``return_block_mass`` also
    ``mass`` (S, max_blocks) fp32: ``mass[s, b]`` is the softmax probability that the
    tokens of block ``block_tables[s, b]`` received, summed over all Hq query heads. Each
    row sums to Hq (every head's probabilities sum to 1); entries past ``ceil(L_s / B)``
    are 0. With ``return_lse`` (not with mass) also ``lse2`` (S, Hq) fp32: log2 of the sum
    of ``2 ** (score * log2(e))`` over the sequence's tokens, -inf for an empty one (whose
    output is 0), so that another part of the history can be merged in (window_attention.py).
    Reads the caches; writes nothing but its outputs.
    """
    assert not (return_lse and return_block_mass), "return_lse or return_block_mass"
    S, Hq, D = q.shape
    Hkv, B = check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, fmt)
    out, args, consts = attention_launch(q, k_cache, v_cache, block_tables, seq_lens, fmt,
                                         sm_scale, precise)
    G = Hq // Hkv
    dev = q.device
    if block_n is None:  # no register spills on sm_80 / sm_90 (ptxas) at 4 warps
        block_n = 32 if D > 64 else 64
        block_n = max(block_n, B) if return_block_mass else block_n
    if block_n < 16 or block_n & (block_n - 1) or (return_block_mass and block_n % B):
        raise ValueError(f"block_n must be a power of two >= 16 (a multiple of the block "
                         f"size {B} with return_block_mass), got {block_n}")
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * B
        num_splits = choose_num_splits(S, Hkv, bound, _num_sms(dev))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    lse2 = torch.empty(S, Hq, device=dev, dtype=torch.float32)  # log2-sum-exp per head
    if num_splits == 1:  # the kernel writes out and lse2 itself
        parts = (out, lse2, lse2, out.stride(0), out.stride(1))
    else:
        acc = torch.empty(S, Hq, num_splits, D, device=dev, dtype=torch.float32)
        m = torch.empty(S, Hq, num_splits, device=dev, dtype=torch.float32)
        parts = (acc, m, torch.empty_like(m), acc.stride(0), acc.stride(1))
    max_blocks = block_tables.shape[1]
    raw = mref = lse2  # never touched without return_block_mass
    if return_block_mass:  # per block: mass relative to the running max it was summed at
        raw = torch.zeros(S, Hq, max_blocks, device=dev, dtype=torch.float32)
        mref = torch.full_like(raw, float("-inf"))
    if S > 0:
        _paged_decode_kernel[(S, Hkv, num_splits)](
            *args, *parts, raw, mref, num_splits, Hq, G, D // 2, max_blocks, **consts,
            BLOCK_SIZE=B, BLOCK_N=block_n, G_P=max(16, triton.next_power_of_2(G)),
            DIRECT=num_splits == 1, RETURN_MASS=return_block_mass, num_warps=num_warps,
        )
        if num_splits > 1:
            lse_merge(parts[0], parts[1], parts[2], out, lse2)
    out = from_storage(out, q, fmt)
    if return_lse:
        return out, lse2
    if not return_block_mass:
        return out
    mass = (raw * torch.exp2(mref - lse2[:, :, None])).nan_to_num_(0.0).sum(1)  # (S, max_blocks)
    return out, mass
