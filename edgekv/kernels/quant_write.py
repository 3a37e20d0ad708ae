"""Quantize new K/V and scatter them into their cache slots, fused: the write half of decode.

Grid ``(cdiv(num_tokens, BLOCK_T), Hkv)``. Program (i, h) loads BLOCK_T tokens of head h
as two head-dim halves (the INT4 split-halves order, kv_tiles.py), computes each vector's
(or group's) scale in fp32 exactly as the format's ``quantize`` does, rounds it to its
stored fp16 value, computes the codes from that *stored* scale (and zero), rounds to
nearest even, clamps, casts, packs, and writes codes, scales and zeros at the token's slot
``block_id * B + offset``. Rotating formats are rotated by the launcher (torch) first.

    symmetric int    s = fp16(clamp(absmax / qmax)),  code = clamp(rne(x / s), -qmax, qmax)
    asymmetric int   s = fp16(clamp((max - min) / levels)), z = fp16(min),
                     code = clamp(rne((x - z) / s), 0, levels)
    fp8              s = fp16(clamp(absmax / fmax)),  code = fp8_rne(clamp(x / s, +-fmax))
    float            value = cast(clamp(x, +-finite max))
    codebook         s = the best of e4m3(+-clamp(|ext * f|)) over the format's factors f
                     and each one's least-squares refit (fp16 for an fp16-scaled codebook),
                     code = number of level midpoints below x / s  (_codebook_codes)

``clamp`` of a scale is to [2**-14, fp16 max] (quant/base.py). Divisions are IEEE
(``tl.div_rn``): Triton's ``/`` may be approximate on GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgekv.quant import KVFormat, QuantizedKV

from .fp8_bits import E4M3, f32_to_fp8, fp8_to_f32
from .kv_tiles import CODEBOOK, FLOAT, FP8E4, FP8E5, INT4, format_table, kernel_format, pad_half
from .launch_checks import check_store, store_args

MIN_SCALE = tl.constexpr(2.0**-14)
MAX_SCALE = tl.constexpr(65504.0)


@triton.jit
def _rne(x):
    """Round to nearest, ties to even (torch.round), for |x| < 2**22."""
    f = tl.floor(x)
    diff = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (diff > 0.5) | ((diff == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _bf16_rne(x):
    """fp32 -> the fp32 value of its nearest-even bf16 (finite x), exact under any cast."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _fp16_scale(raw):
    return tl.minimum(tl.maximum(raw, MIN_SCALE), MAX_SCALE).to(tl.float16)


@triton.jit
def _signed_scale(raw, FP8: tl.constexpr):
    """fp32 -> the fp32 value of the stored scale, keeping the sign, magnitude clamped
    (codebook.signed_scale): e4m3 if FP8, else fp16."""
    if FP8:
        mag = tl.minimum(tl.maximum(tl.abs(raw), 2.0**-9), 448.0)
        return fp8_to_f32(f32_to_fp8(tl.where(raw < 0, -mag, mag), E4M3), E4M3)
    else:
        mag = _fp16_scale(tl.abs(raw))
        return tl.where(raw < 0, -mag, mag).to(tl.float32)


@triton.jit
def _group_stat(lo, hi, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, HALF_P: tl.constexpr,
                IS_MAX: tl.constexpr):
    """Max (or min) of each scale group, for both halves: (T, 1, 1) each for one group
    spanning both halves, else (T, HALF_P / GROUP, 1) each."""
    if GROUP == 0:
        if IS_MAX:
            st = tl.maximum(tl.max(lo, axis=1), tl.max(hi, axis=1))
        else:
            st = tl.minimum(tl.min(lo, axis=1), tl.min(hi, axis=1))
        st_lo = st[:, None, None]
        st_hi = st_lo
    else:  # no early return above: Triton compiles statements after a static return
        NG: tl.constexpr = HALF_P // GROUP
        lo3 = tl.reshape(lo, (BLOCK_T, NG, GROUP))
        hi3 = tl.reshape(hi, (BLOCK_T, NG, GROUP))
        if IS_MAX:
            st_lo = tl.max(lo3, axis=2)[:, :, None]
            st_hi = tl.max(hi3, axis=2)[:, :, None]
        else:
            st_lo = tl.min(lo3, axis=2)[:, :, None]
            st_hi = tl.min(hi3, axis=2)[:, :, None]
    return st_lo, st_hi


@triton.jit
def _store_groups(ptr, srows, st_lo, st_hi, t_mask, GROUP: tl.constexpr, HALF_P: tl.constexpr):
    """Store per-group fp16 values (shapes from _group_stat) at each token's scale row."""
    if GROUP == 0:
        tl.store(ptr + srows, tl.reshape(st_lo, (st_lo.shape[0],)), mask=t_mask)
    else:
        NG: tl.constexpr = HALF_P // GROUP
        j = tl.arange(0, NG)
        off = srows[:, None] + j[None, :]  # (T, NG)
        tl.store(ptr + off, tl.reshape(st_lo, (st_lo.shape[0], NG)), mask=t_mask[:, None])
        tl.store(ptr + off + NG, tl.reshape(st_hi, (st_lo.shape[0], NG)), mask=t_mask[:, None])


@triton.jit
def _asym_codes(lo, hi, lo3, hi3, d_mask, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
                HALF_P: tl.constexpr, LEVELS: tl.constexpr):
    """Asymmetric integer: (codes, scales, zeros) per half; codes (T, groups, channels)."""
    big = float("inf")  # padded channels must not count as values
    mx_lo, mx_hi = _group_stat(tl.where(d_mask[None, :], lo, -big),
                               tl.where(d_mask[None, :], hi, -big), GROUP, BLOCK_T, HALF_P, True)
    mn_lo, mn_hi = _group_stat(tl.where(d_mask[None, :], lo, big),
                               tl.where(d_mask[None, :], hi, big), GROUP, BLOCK_T, HALF_P, False)
    s_lo = _fp16_scale(tl.div_rn(mx_lo - mn_lo, LEVELS))
    s_hi = _fp16_scale(tl.div_rn(mx_hi - mn_hi, LEVELS))
    z_lo = mn_lo.to(tl.float16)
    z_hi = mn_hi.to(tl.float16)
    c_lo = _rne(tl.div_rn(lo3 - z_lo.to(tl.float32), s_lo.to(tl.float32)))
    c_hi = _rne(tl.div_rn(hi3 - z_hi.to(tl.float32), s_hi.to(tl.float32)))
    c_lo = tl.minimum(tl.maximum(c_lo, 0.0), LEVELS)
    c_hi = tl.minimum(tl.maximum(c_hi, 0.0), LEVELS)
    return c_lo, c_hi, s_lo, s_hi, z_lo, z_hi


@triton.jit
def _sym_codes(lo, hi, lo3, hi3, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
               HALF_P: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """Symmetric integer or fp8: (codes, scales) per half. fp8 "codes" are the clamped
    fp32 values, still to be rounded to fp8."""
    a_lo, a_hi = _group_stat(tl.abs(lo), tl.abs(hi), GROUP, BLOCK_T, HALF_P, True)
    s_lo = _fp16_scale(tl.div_rn(a_lo, QMAX))
    s_hi = _fp16_scale(tl.div_rn(a_hi, QMAX))
    c_lo = tl.div_rn(lo3, s_lo.to(tl.float32))
    c_hi = tl.div_rn(hi3, s_hi.to(tl.float32))
    if not IS_FP8:
        c_lo = _rne(c_lo)
        c_hi = _rne(c_hi)
    c_lo = tl.minimum(tl.maximum(c_lo, -QMAX), QMAX)
    c_hi = tl.minimum(tl.maximum(c_hi, -QMAX), QMAX)
    return c_lo, c_hi, s_lo, s_hi


@triton.jit
def _midpoint_step(c, y, table_ptr, STEP: tl.constexpr):
    """One step of counting the midpoints below y: codes c (a multiple of 2 STEP so far)
    gain STEP where the midpoint between levels c + STEP - 1 and c + STEP is below y."""
    k = c + (STEP - 1)
    mid = (tl.load(table_ptr + k) + tl.load(table_ptr + k + 1)) * 0.5
    return c + tl.where(mid < y, STEP, 0)


@triton.jit
def _nearest_levels(x3, s, table_ptr):
    """Codes of x3 (T, NG, GROUP) fp32 at fp32 scales s (T, NG, 1), their squared error
    per group (T, NG), and the sums of x * level and level^2 per group (T, NG, 1), for the
    least-squares refit: code = the number of midpoints between the table's 16 levels
    strictly below ``x / s`` (torch.bucketize), error = sum (x - level * s)^2."""
    y = tl.div_rn(x3, s)
    c = tl.zeros(x3.shape, tl.int32)  # a binary search: 4 gathered midpoints, not 15
    c = _midpoint_step(c, y, table_ptr, 8)
    c = _midpoint_step(c, y, table_ptr, 4)
    c = _midpoint_step(c, y, table_ptr, 2)
    c = _midpoint_step(c, y, table_ptr, 1)
    lv = tl.load(table_ptr + c)
    r = x3 - lv * s
    return (c, tl.sum(r * r, axis=2), tl.sum(x3 * lv, axis=2)[:, :, None],
            tl.sum(lv * lv, axis=2)[:, :, None])


@triton.jit
def _codebook_codes(x3, table_ptr, NF: tl.constexpr, FP8: tl.constexpr):
    """Codebook codes (T, NG, GROUP) int32 and signed scales (T, NG, 1) of one half's
    groups x3 (T, NG, GROUP), as CodebookFormat.quantize_storage: the candidates, in order,
    ``s = ext * f`` (ext the group's value of largest magnitude, the first; f the NF factors
    after the levels in the table) and each one's least-squares refit, each rounded to the
    stored scale (``_signed_scale``); the one whose codes err least wins (the first on a
    tie). Scales come back as stored: e4m3 bytes if FP8, else fp16.

    Each candidate's codes are the format's, bit for bit; its error and refit sums are
    summed in another order (and a GPU may fuse ``x - level * s`` into one multiply-add),
    so where two candidates' errors tie within a few 1e-6 relative the other one may win,
    its error then that close to the least (measured: bit-identical writes under the
    interpreter).
    """
    first = tl.argmax(tl.abs(x3), axis=2, tie_break_left=True)  # (T, NG)
    j = tl.arange(0, x3.shape[2])
    ext = tl.sum(tl.where(j[None, None, :] == first[:, :, None], x3, 0.0), axis=2)
    ext = ext[:, :, None]  # (T, NG, 1) signed extreme (a sum of it and zeros: exact)
    best_err = tl.zeros(ext.shape, tl.float32)
    best_s = tl.zeros(ext.shape, tl.float32)
    best_c = tl.zeros(x3.shape, tl.int32)
    for i in range(NF):
        raw = ext * tl.load(table_ptr + 16 + i)  # (T, NG, 1)
        for r in tl.static_range(2):  # the candidate, then its least-squares refit
            s = _signed_scale(raw, FP8)
            c, err, num, den = _nearest_levels(x3, s, table_ptr)
            better = (err[:, :, None] < best_err) | ((i == 0) & (r == 0))  # (T, NG, 1)
            best_err = tl.where(better, err[:, :, None], best_err)
            best_s = tl.where(better, s, best_s)
            best_c = tl.where(better, c, best_c)
            raw = tl.div_rn(num, tl.maximum(den, 1e-30))
    if FP8:
        return best_c, f32_to_fp8(best_s, E4M3)
    else:
        return best_c, best_s.to(tl.float16)


@triton.jit
def _quant_write_kernel(
    x_ptr, stride_xt, stride_xh, slot_ptr, T, HALF,
    data_ptr, scale_ptr, zero_ptr, d_b, d_h, d_t, s_b, s_h, s_t,  # the store (store_args)
    table_ptr,  # (format_table) fp32: a codebook's levels, then its NF scale factors
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, HALF_P: tl.constexpr,
    KIND: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, NF: tl.constexpr,
):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1).to(tl.int64)  # (T,)
    t_mask = (t < T) & (slot >= 0)  # negative slots are never written
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    rows = blk * d_b + h * d_h + off * d_t  # (T,) int64
    srows = blk * s_b + h * s_h + off * s_t
    d = tl.arange(0, HALF_P)
    d_mask = d < HALF
    mask = t_mask[:, None] & d_mask[None, :]
    x_off = t.to(tl.int64)[:, None] * stride_xt + h * stride_xh + d[None, :]
    lo = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)  # (T, HALF_P)
    hi = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = data_ptr + rows[:, None] + d[None, :]
    ety = data_ptr.dtype.element_ty

    if KIND == FLOAT:
        lo = tl.minimum(tl.maximum(lo, -QMAX), QMAX)
        hi = tl.minimum(tl.maximum(hi, -QMAX), QMAX)
        if ety == tl.bfloat16:  # round to nearest even in the bits: the interpreter truncates
            lo = _bf16_rne(lo)
            hi = _bf16_rne(hi)
        tl.store(dst, lo.to(ety), mask=mask)
        tl.store(dst + HALF, hi.to(ety), mask=mask)
    else:  # (no early return above: Triton compiles statements after a static return)
        if GROUP == 0:  # (T, groups, channels): one group spans both halves
            lo3 = lo[:, None, :]
            hi3 = hi[:, None, :]
        else:
            lo3 = tl.reshape(lo, (BLOCK_T, HALF_P // GROUP, GROUP))
            hi3 = tl.reshape(hi, (BLOCK_T, HALF_P // GROUP, GROUP))
        if KIND == CODEBOOK:  # groups never span the halves (kernel_format)
            fp8_scale: tl.constexpr = scale_ptr.dtype.element_ty == tl.uint8
            c_lo, s_lo = _codebook_codes(lo3, table_ptr, NF, fp8_scale)
            c_hi, s_hi = _codebook_codes(hi3, table_ptr, NF, fp8_scale)
        elif HAS_ZERO:
            c_lo, c_hi, s_lo, s_hi, z_lo, z_hi = _asym_codes(lo, hi, lo3, hi3, d_mask, GROUP,
                                                             BLOCK_T, HALF_P, LEVELS)
            _store_groups(zero_ptr, srows, z_lo, z_hi, t_mask, GROUP, HALF_P)
        else:
            c_lo, c_hi, s_lo, s_hi = _sym_codes(lo, hi, lo3, hi3, GROUP, BLOCK_T, HALF_P, QMAX,
                                                KIND == FP8E4 or KIND == FP8E5)
        _store_groups(scale_ptr, srows, s_lo, s_hi, t_mask, GROUP, HALF_P)

        c_lo = tl.reshape(c_lo, (BLOCK_T, HALF_P))
        c_hi = tl.reshape(c_hi, (BLOCK_T, HALF_P))
        if KIND == INT4 or KIND == CODEBOOK:  # split halves: low nibbles dims [0, D/2)
            b = (c_lo + OFFSET).to(tl.uint8) | ((c_hi + OFFSET).to(tl.uint8) << 4)
            tl.store(dst, b, mask=mask)
        elif KIND == FP8E4 or KIND == FP8E5:
            tl.store(dst, f32_to_fp8(c_lo, KIND - FP8E4), mask=mask)  # flavor 0: e4m3, 1: e5m2
            tl.store(dst + HALF, f32_to_fp8(c_hi, KIND - FP8E4), mask=mask)
        else:
            tl.store(dst, c_lo.to(tl.int32).to(ety), mask=mask)
            tl.store(dst + HALF, c_hi.to(tl.int32).to(ety), mask=mask)


def quant_write(store: QuantizedKV, x: torch.Tensor, slots: torch.Tensor, fmt: KVFormat,
                block_t: int = 16) -> None:
    """Quantize ``x`` (num_tokens, Hkv, D), original basis, into ``store`` at ``slots``.

    slots: (num_tokens,) int flat slot ids ``block_id * B + offset``; negative ids are
    skipped. Mutates ``store`` (codes, scales, zeros) at those slots only. Two tokens with
    the same slot: which one lands is unspecified.
    """
    T, Hkv, D = x.shape
    check_store(store, fmt, D, "store")
    kf = kernel_format(fmt, D)
    if store.data.shape[1] != Hkv or tuple(slots.shape) != (T,):
        raise ValueError(f"expected x (tokens, {store.data.shape[1]}, {D}) and slots "
                         f"({T},), got {tuple(x.shape)} and {tuple(slots.shape)}")
    if T == 0:
        return
    xs = fmt.to_storage_basis(x.float()) if fmt.rotate else x  # (T, Hkv, D)
    xs = xs if xs.stride(-1) == 1 else xs.contiguous()
    slots = slots.to(torch.int64).contiguous()
    _quant_write_kernel[(triton.cdiv(T, block_t), Hkv)](
        xs, xs.stride(0), xs.stride(1), slots, T, D // 2, *store_args(store),
        format_table(fmt, xs.device),
        BLOCK_SIZE=store.data.shape[2], BLOCK_T=block_t, HALF_P=pad_half(D),
        KIND=kf.kind, OFFSET=kf.offset, GROUP=kf.group, HAS_ZERO=kf.has_zero,
        QMAX=kf.qmax, LEVELS=kf.levels, NF=kf.num_factors, num_warps=4,
    )


def write_kv_triton(k_store: QuantizedKV, v_store: QuantizedKV, k: torch.Tensor,
                    v: torch.Tensor, slots: torch.Tensor, fmt: KVFormat) -> None:
    """Quantize-and-write new K and V (num_tokens, Hkv, D) at ``slots`` (two launches)."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must be (tokens, Hkv, D) of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    quant_write(k_store, k, slots, fmt)
    quant_write(v_store, v, slots, fmt)
