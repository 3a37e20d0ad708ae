"""What the kernels need to know about a KV format, and the tile helpers they share.

``kernel_format(fmt, head_dim)`` turns a :class:`~edgekv.quant.KVFormat` into the constants
the kernels are specialised on, or raises :class:`UnsupportedFormat`. The ``@triton.jit``
helpers below load one tile of stored K or V and dequantize it in registers, and (the last
four) make the steps both attention kernels take; those two kernels alone call them.

Head-dim halves. Every kernel works on head_dim as two halves of ``HALF = D / 2`` channels,
because INT4 packs dims ``[0, D/2)`` in the low nibbles and ``[D/2, D)`` in the high nibbles
of the same bytes (quant/packing.py). For other formats the two halves are two loads. Each
half is padded to ``HALF_P`` (a power of two >= 16, as ``tl.dot`` wants) and masked.

Scales. With one scale per token-head (``GROUP == 0``) the K scale multiplies the scores
after the dot and the V scale multiplies the probabilities before it, so codes enter the
dot exactly; an asymmetric zero adds ``z * sum(q)`` to a score and ``sum_j p_j z_j`` to an
output. With group scales (``GROUP`` channels each) the tile is dequantized element-wise.

Codebook (``CODEBOOK``, quant/codebook.py). Nibbles index 16 fp32 levels: the kernels
load the table (``format_table``, their ``table_ptr``) into registers and look codes up
with ``tl.gather`` (warp shuffles in the compiled PTX; a ``tl.load`` per value instead
was staged through 80 KB of shared memory by the loop pipeliner, a select chain costs 15
selects per value). The levels are not exact in fp16, so the format needs group scales
and its tiles are dequantized element-wise before the dot like any grouped format; its
scales are e4m3 bytes (``_dequant_groups`` decodes them where the scale pointer is uint8).

Precision. Dot operands are fp16 (``dot_dtype``): codes are exact in it, the query, the
softmax weights and element-wise dequantized tiles are not (~1e-3 relative error in the
output). ``PRECISE`` adds the product of each operand's fp16 rounding residual (one more
dot per operand: ``split_operand``, ``_mm``), which brings the result to ~1e-6 of the
fp32 reference; decode, memory-bound, uses it by default, prefill does not. Weights
``p * scale`` are multiplied by ``WSCALE`` (a power of two near the largest code) before
rounding, so they stay out of fp16's subnormal range (fp8 scales are ~absmax / 448 or
/ 57344), and the sum is divided back.

    N = tokens in the tile   M = query rows   HALF_P = padded half of head_dim
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from edgekv.quant import CodebookFormat, FloatFormat, Fp8Format, IntFormat, KVFormat

from .fp8_bits import fp8_to_f32

# storage kinds (the KIND constexpr)
FLOAT = tl.constexpr(0)  # fp32 / fp16 / bf16 values, no scale
INT8 = tl.constexpr(1)  # one signed or unsigned byte per channel
INT4 = tl.constexpr(2)  # two nibbles per byte, split halves
FP8E4 = tl.constexpr(3)  # e4m3fn bytes
FP8E5 = tl.constexpr(4)  # e5m2 bytes
CODEBOOK = tl.constexpr(5)  # two nibbles per byte, split halves, indexing a table of levels


class UnsupportedFormat(ValueError):
    """The Triton kernels cannot handle this format or shape (the torch path can)."""


@dataclass(frozen=True)
class KernelFormat:
    """Compile-time constants describing one stored format (see module docstring)."""

    kind: int
    offset: int  # subtracted from int4 nibbles (symmetric int4 stores code + 8)
    group: int  # 0: one scale per token-head; else channels per scale group
    has_scale: bool
    has_zero: bool
    symmetric: bool  # integer formats: code range [-qmax, qmax] vs [0, levels]
    qmax: float  # symmetric integer: largest code; fp8 / float: largest finite value
    levels: float  # asymmetric integer: largest code
    wscale: float  # power of two near the largest code magnitude (pv_tile's WSCALE)
    num_factors: int = 0  # codebook: scale candidates, after the levels in format_table


def kernel_format(fmt: KVFormat, head_dim: int) -> KernelFormat:
    """Describe ``fmt`` for the kernels; raise UnsupportedFormat if they cannot run it."""
    if head_dim % 2 or head_dim < 2:
        raise UnsupportedFormat(f"the Triton kernels need an even head_dim, got {head_dim}")
    fmt.check_head_dim(head_dim)
    half = head_dim // 2
    if isinstance(fmt, FloatFormat):
        if fmt.storage_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UnsupportedFormat(f"{fmt.name}: storage dtype {fmt.storage_dtype}")
        fmax = float(torch.finfo(fmt.storage_dtype).max)
        return KernelFormat(FLOAT.value, offset=0, group=0, has_scale=False, has_zero=False,
                            symmetric=True, qmax=fmax, levels=0.0, wscale=1.0)
    if isinstance(fmt, Fp8Format):
        kind = {torch.float8_e4m3fn: FP8E4.value, torch.float8_e5m2: FP8E5.value}.get(
            fmt.fp8_dtype)
        if kind is None:
            raise UnsupportedFormat(f"{fmt.name}: fp8 dtype {fmt.fp8_dtype}")
        return KernelFormat(kind, offset=0, group=0, has_scale=True, has_zero=False,
                            symmetric=True, qmax=fmt.fmax, levels=0.0, wscale=_pow2(fmt.fmax))
    if isinstance(fmt, IntFormat):
        group = _scale_group(fmt, half)
        top = fmt.qmax if fmt.symmetric else fmt.levels
        return KernelFormat(INT4.value if fmt.bits == 4 else INT8.value, offset=fmt.offset,
                            group=group, has_scale=True, has_zero=fmt.has_zero,
                            symmetric=fmt.symmetric, qmax=float(fmt.qmax),
                            levels=float(fmt.levels), wscale=_pow2(top))
    if isinstance(fmt, CodebookFormat):
        group = _scale_group(fmt, half)
        if not group:  # levels are not exact in DOT: they must be scaled before the dot
            raise UnsupportedFormat(f"{fmt.name}: a codebook needs group scales")
        return KernelFormat(CODEBOOK.value, offset=0, group=group, has_scale=True,
                            has_zero=False, symmetric=True, qmax=0.0, levels=0.0, wscale=1.0,
                            num_factors=len(fmt.factors))
    raise UnsupportedFormat(f"no Triton kernel for format {fmt!r}")


def _scale_group(fmt: IntFormat | CodebookFormat, half: int) -> int:
    """Channels per scale group (0: one scale per token-head), or UnsupportedFormat."""
    group = fmt.group_size or 0
    if group and (half % group or group & (group - 1) or half & (half - 1)):
        # the write kernel reshapes each half into whole groups
        raise UnsupportedFormat(f"{fmt.name}: group size {group} must be a power of two "
                                f"dividing head_dim/2 = {half}, itself a power of two")
    if group and half < pad_half(2 * half):
        # a padded half holds HALF_P / GROUP groups: the write kernel would store the
        # padding's scales over the next half's
        raise UnsupportedFormat(f"{fmt.name}: head_dim/2 = {half} is under the kernels' "
                                f"{pad_half(2 * half)}-channel tile")
    return group


@functools.lru_cache(maxsize=16)
def format_table(fmt: KVFormat, device: torch.device) -> torch.Tensor:
    """The fp32 table the kernels' ``table_ptr`` points at, made once per (format, device)
    so that a launch copies nothing: a codebook's 16 levels then its ``num_factors`` scale
    factors (quant/codebook.py); for every other format one 0, never read."""
    vals = [*fmt.levels, *fmt.factors] if isinstance(fmt, CodebookFormat) else [0.0]
    return torch.tensor(vals, dtype=torch.float32, device=device)


def _pow2(x: float) -> float:
    return float(triton.next_power_of_2(int(x)))


def dot_dtype(fmt: KVFormat, device: torch.device) -> tl.dtype:
    """Operand dtype of the kernels' tl.dot for ``fmt``.

    Codes of the per-token-head formats (int8, int4 nibbles, fp8 values) are exact in fp16,
    and their scales are applied outside the dot, so fp16 loses only the query's and the
    weights' low bits. Grouped formats (int4_g32, the codebook's levels) enter the dot
    dequantized, rounded to fp16 as the query is, and ``PRECISE`` compensates that rounding
    too (``_mm``'s SPLIT_B), so fp16 serves them as well. fp32 storage (the exact
    reference) multiplies in IEEE fp32. bf16 storage uses bf16 on a GPU; the CPU
    interpreter cannot multiply bf16, so it uses fp32 there.
    """
    if isinstance(fmt, FloatFormat) and fmt.storage_dtype == torch.float32:
        return tl.float32
    if isinstance(fmt, FloatFormat) and fmt.storage_dtype == torch.bfloat16:
        return tl.bfloat16 if device.type == "cuda" else tl.float32
    return tl.float16


def pad_half(head_dim: int) -> int:
    """HALF_P: head_dim / 2 rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim // 2))


# ---- Triton helpers ----------------------------------------------------------------------
@triton.jit
def load_halves(data_ptr, table_ptr, rows, d, HALF, t_mask, d_mask, KIND: tl.constexpr,
                OFFSET: tl.constexpr):
    """Both halves of a stored tile as fp32 code values (a codebook's: its levels, read
    from ``table_ptr``): two (N, HALF_P) tensors.

    rows: (N,) int64 element offsets of each token's vector; d: (HALF_P,) channel index.
    Masked tokens and padded channels read as 0.
    """
    mask = t_mask[:, None] & d_mask[None, :]
    ptr = data_ptr + rows[:, None] + d[None, :]  # (N, HALF_P)
    if KIND == CODEBOOK:  # nibbles index the 16 levels, held in registers
        b = tl.load(ptr, mask=mask, other=0).to(tl.int32)
        lv = tl.load(table_ptr + tl.arange(0, 16))  # (16,)
        lv = tl.broadcast_to(lv[None, :], (b.shape[0], 16))  # (N, 16): gather's rank
        lo = tl.where(mask, tl.gather(lv, b & 0xF, 1), 0.0)  # dims [0, D/2)
        hi = tl.where(mask, tl.gather(lv, b >> 4, 1), 0.0)  # dims [D/2, D)
    elif KIND == INT4:
        b = tl.load(ptr, mask=mask, other=0)
        lo = (b & 0xF).to(tl.float32) - OFFSET  # dims [0, D/2)
        hi = (b >> 4).to(tl.float32) - OFFSET  # dims [D/2, D)
    else:
        raw_lo = tl.load(ptr, mask=mask, other=0)
        raw_hi = tl.load(ptr + HALF, mask=mask, other=0)
        if KIND == FP8E4 or KIND == FP8E5:
            lo = fp8_to_f32(raw_lo, KIND - FP8E4)  # flavor 0: e4m3fn, 1: e5m2
            hi = fp8_to_f32(raw_hi, KIND - FP8E4)
        else:
            lo = raw_lo.to(tl.float32)
            hi = raw_hi.to(tl.float32)
    return lo, hi


@triton.jit
def _dequant_groups(lo, hi, scale_ptr, zero_ptr, srows, d, HALF, t_mask, d_mask,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Apply per-group scales (and zeros) element-wise to both halves of a tile. Scales are
    fp16, or e4m3 bytes where ``scale_ptr`` points at uint8 (the codebook's)."""
    mask = t_mask[:, None] & d_mask[None, :]
    g_lo = srows[:, None] + (d // GROUP)[None, :]  # (N, HALF_P) scale offsets
    g_hi = srows[:, None] + ((d + HALF) // GROUP)[None, :]
    s_lo = tl.load(scale_ptr + g_lo, mask=mask, other=0)
    s_hi = tl.load(scale_ptr + g_hi, mask=mask, other=0)
    if scale_ptr.dtype.element_ty == tl.uint8:
        s_lo = fp8_to_f32(s_lo, 0)  # flavor 0: e4m3fn
        s_hi = fp8_to_f32(s_hi, 0)
    lo = lo * s_lo.to(tl.float32)
    hi = hi * s_hi.to(tl.float32)
    if HAS_ZERO:
        lo += tl.load(zero_ptr + g_lo, mask=mask, other=0).to(tl.float32)
        hi += tl.load(zero_ptr + g_hi, mask=mask, other=0).to(tl.float32)
    return lo, hi


@triton.jit
def split_operand(a, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """fp32 a -> (a1, a2) in DOT with a ~ a1 + a2: a1 rounded, a2 its rounding residual
    (zeros unless SPLIT). Call once per loop-invariant operand (the query)."""
    a1 = a.to(DOT)
    if SPLIT:
        a2 = (a - a1.to(tl.float32)).to(DOT)
    else:
        a2 = a1
    return a1, a2


@triton.jit
def query_sum(q_lo, q_lo2, q_hi, q_hi2, PRECISE: tl.constexpr):
    """(M,) fp32 channel sums of the query as the dots see it (rounded, + residual if
    PRECISE). The zero term ``z * sum(q)`` must use the same rounded q as ``s * (q . c)``:
    with an asymmetric format both terms are large and cancel."""
    q_sum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)
    if PRECISE:
        q_sum += tl.sum(q_lo2.to(tl.float32), axis=1) + tl.sum(q_hi2.to(tl.float32), axis=1)
    return q_sum


@triton.jit
def _mm(a1, a2, b, acc, DOT: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr):
    """acc + (a1 [+ a2]) @ b, a1/a2 from split_operand, b fp32 rounded to DOT.

    SPLIT_A adds the product of a's residual, SPLIT_B that of b's (compensated product):
    an fp16 dot then comes close to fp32 accuracy for one more dot each.
    """
    b1 = b.to(DOT)
    acc = tl.dot(a1, b1, acc, input_precision="ieee")
    if SPLIT_A:
        acc = tl.dot(a2, b1, acc, input_precision="ieee")
    if SPLIT_B:
        acc = tl.dot(a1, (b - b1.to(tl.float32)).to(DOT), acc, input_precision="ieee")
    return acc


@triton.jit
def qk_tile(q_lo, q_lo2, q_hi, q_hi2, q_sum, k_ptr, ks_ptr, kz_ptr, table_ptr, rows, srows,
            d, HALF, t_mask, d_mask, KIND: tl.constexpr, OFFSET: tl.constexpr,
            GROUP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, DOT: tl.constexpr,
            PRECISE: tl.constexpr):
    """Scores q . k of M query rows against N stored keys: (M, N) fp32, scales applied.

    q_lo, q_hi: (M, HALF_P) halves of q in DOT, q_lo2, q_hi2 their residuals
    (split_operand, used if PRECISE); q_sum: (M,) fp32 sum of the q the dots see
    (``query_sum``), for asymmetric formats with one group; table_ptr: ``format_table``.
    Codes are exact in DOT, so PRECISE only needs the residual of q, and of
    group-dequantized keys. Masked keys score 0 here: the caller masks them.
    """
    k_lo, k_hi = load_halves(k_ptr, table_ptr, rows, d, HALF, t_mask, d_mask, KIND, OFFSET)
    if GROUP > 0:
        k_lo, k_hi = _dequant_groups(k_lo, k_hi, ks_ptr, kz_ptr, srows, d, HALF, t_mask,
                                     d_mask, GROUP, HAS_ZERO)
    s = tl.zeros((q_lo.shape[0], k_lo.shape[0]), tl.float32)  # (M, N)
    s = _mm(q_lo, q_lo2, tl.trans(k_lo), s, DOT, PRECISE, PRECISE and GROUP > 0)
    s = _mm(q_hi, q_hi2, tl.trans(k_hi), s, DOT, PRECISE, PRECISE and GROUP > 0)
    if HAS_SCALE and GROUP == 0:
        ks = tl.load(ks_ptr + srows, mask=t_mask, other=0).to(tl.float32)  # (N,)
        s = s * ks[None, :]
        if HAS_ZERO:
            kz = tl.load(kz_ptr + srows, mask=t_mask, other=0).to(tl.float32)  # (N,)
            s += q_sum[:, None] * kz[None, :]
    return s


@triton.jit
def pv_tile(p, v_ptr, vs_ptr, vz_ptr, table_ptr, rows, srows, d, HALF, t_mask, d_mask,
            KIND: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
            HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, DOT: tl.constexpr,
            PRECISE: tl.constexpr, WSCALE: tl.constexpr):
    """Weighted sum p @ v of N stored values: two (M, HALF_P) fp32 halves.

    p: (M, N) fp32 unnormalised probabilities, 0 on masked tokens. With one scale per
    token the scale joins the weights, ``(p * s) @ codes``; PRECISE compensates the
    rounding of the weights (and of group-dequantized values). Scales are about
    ``absmax / largest code``, so the weights are multiplied by WSCALE (a power of two near
    the largest code) to keep them out of fp16's subnormal range, and the sum divided back.
    """
    v_lo, v_hi = load_halves(v_ptr, table_ptr, rows, d, HALF, t_mask, d_mask, KIND, OFFSET)
    if GROUP > 0:
        v_lo, v_hi = _dequant_groups(v_lo, v_hi, vs_ptr, vz_ptr, srows, d, HALF, t_mask,
                                     d_mask, GROUP, HAS_ZERO)
        w = p
    elif HAS_SCALE:
        vs = tl.load(vs_ptr + srows, mask=t_mask, other=0).to(tl.float32)  # (N,)
        w = p * (vs * WSCALE)[None, :]
    else:
        w = p
    w1, w2 = split_operand(w, DOT, PRECISE)
    o_lo = tl.zeros((p.shape[0], v_lo.shape[1]), tl.float32)  # (M, HALF_P)
    o_lo = _mm(w1, w2, v_lo, o_lo, DOT, PRECISE, PRECISE and GROUP > 0)
    o_hi = tl.zeros((p.shape[0], v_lo.shape[1]), tl.float32)
    o_hi = _mm(w1, w2, v_hi, o_hi, DOT, PRECISE, PRECISE and GROUP > 0)
    if HAS_SCALE and GROUP == 0:
        o_lo = o_lo * (1.0 / WSCALE)
        o_hi = o_hi * (1.0 / WSCALE)
    if HAS_ZERO and GROUP == 0:
        vz = tl.load(vz_ptr + srows, mask=t_mask, other=0).to(tl.float32)  # (N,)
        if PRECISE:
            pz = p
        else:  # the weights the dot really used: keeps code and zero terms consistent
            inv = 1.0 / (tl.where(t_mask, vs, 1.0) * WSCALE)  # (N,); w1 is 0 if masked
            pz = w1.to(tl.float32) * inv[None, :]
        z = tl.sum(pz * vz[None, :], axis=1)  # (M,)
        o_lo += z[:, None]
        o_hi += z[:, None]
    return o_lo, o_hi


# ---- the attention kernels' shared steps (paged_decode.py, paged_prefill.py) -----------
@triton.jit
def load_query(q_ptr, q_off, q_mask, HALF, DOT: tl.constexpr, PRECISE: tl.constexpr):
    """M query rows as ``qk_tile`` takes them: (q_lo, q_lo2, q_hi, q_hi2, q_sum).

    q_off: (M, HALF_P) offsets of the first half's channels (the second half is HALF on);
    q_mask: (M, HALF_P), masked rows and padded channels read as 0. The halves are in DOT
    with their residuals (``split_operand``), q_sum (M,) fp32 is ``query_sum``.
    """
    q_lo = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    q_hi = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0).to(tl.float32)
    q_lo, q_lo2 = split_operand(q_lo, DOT, PRECISE)  # fp32 -> DOT (+ residual)
    q_hi, q_hi2 = split_operand(q_hi, DOT, PRECISE)
    return q_lo, q_lo2, q_hi, q_hi2, query_sum(q_lo, q_lo2, q_hi, q_hi2, PRECISE)


@triton.jit
def softmax_init(M: tl.constexpr, HALF_P: tl.constexpr):
    """The empty online-softmax state of M rows, (m_i, l_i, acc_lo, acc_hi): running max
    (M,) -inf, running sum (M,) 0 and the two (M, HALF_P) output halves 0, all fp32."""
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    return m_i, l_i, tl.zeros((M, HALF_P), tl.float32), tl.zeros((M, HALF_P), tl.float32)


@triton.jit
def kv_rows(bt_row, t, t_mask, hk, kd_b, kd_h, kd_t, ks_b, ks_h, ks_t, vd_b, vd_h, vd_t,
            vs_b, vs_h, vs_t, BLOCK_SIZE: tl.constexpr):
    """(k_rows, k_srows, v_rows, v_srows): (N,) int64 offsets of KV positions t of KV head
    hk in the K and V data and scale tensors (``store_args`` strides), through the block
    table row ``bt_row``. Masked positions read block 0 (their loads are masked too)."""
    blk = tl.load(bt_row + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)  # (N,)
    off = (t % BLOCK_SIZE).to(tl.int64)
    return (blk * kd_b + hk * kd_h + off * kd_t, blk * ks_b + hk * ks_h + off * ks_t,
            blk * vd_b + hk * vd_h + off * vd_t, blk * vs_b + hk * vs_h + off * vs_t)


@triton.jit
def attend_tile(m_i, l_i, acc_lo, acc_hi, seen, sm_scale_log2, q_lo, q_lo2, q_hi, q_hi2,
                q_sum, k_ptr, ks_ptr, kz_ptr, k_rows, k_srows, v_ptr, vs_ptr, vz_ptr, v_rows,
                v_srows, table_ptr, d, HALF, t_mask, d_mask, KIND: tl.constexpr,
                OFFSET: tl.constexpr, GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_ZERO: tl.constexpr, DOT: tl.constexpr, PRECISE: tl.constexpr,
                WSCALE: tl.constexpr):
    """One online-softmax step over a tile of N stored tokens, in log2 units: the state
    ``softmax_init`` made, updated, (m_i, l_i, acc_lo, acc_hi), then p (M, N) fp32, the
    tile's weights ``2 ** (score - m_i)`` against the new max m_i.

    seen: bool, (M, N) or (1, N), the caller's mask of the scores that count (masked tokens
    must be out of it); the others weigh 0. A row must see a token in its first tile (its
    max would stay -inf). sm_scale_log2 = softmax scale * log2(e).
    """
    sc = qk_tile(q_lo, q_lo2, q_hi, q_hi2, q_sum, k_ptr, ks_ptr, kz_ptr, table_ptr, k_rows,
                 k_srows, d, HALF, t_mask, d_mask, KIND, OFFSET, GROUP, HAS_SCALE, HAS_ZERO,
                 DOT, PRECISE)
    sc = tl.where(seen, sc * sm_scale_log2, float("-inf"))  # (M, N)
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    o_lo, o_hi = pv_tile(p, v_ptr, vs_ptr, vz_ptr, table_ptr, v_rows, v_srows, d, HALF,
                         t_mask, d_mask, KIND, OFFSET, GROUP, HAS_SCALE, HAS_ZERO, DOT,
                         PRECISE, WSCALE)
    return m_new, l_i, acc_lo * alpha[:, None] + o_lo, acc_hi * alpha[:, None] + o_hi, p
