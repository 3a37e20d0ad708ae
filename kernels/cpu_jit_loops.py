"""The compiled loop nests of the CPU decode path (numba; imported only by cpu_jit.py).

Two kernels, both parallel over work items and exact in their own arithmetic:

``attend``       one new query per sequence over its paged history, read as stored: per
                 (sequence, KV head, split) a walk over the blocks with an online softmax;
                 every row's codes are converted in registers and used by the head group's
                 G queries; splits of one history merge by their maxima and sums.
``decode_layer`` a decode layer's whole attention step after the qkv projection: RoPE of q
                 and k, the format's rotation (a fast Walsh-Hadamard transform, not a
                 matmul), quantize-and-write of k and v into their slots, ``attend``'s loop
                 over the history, the output rotated back. One call where the torch path
                 dispatches ~40 ops.

Storage kinds (cpu_jit.KIND_*), every one passed as bytes so one compiled function serves
all: 0 int8 codes; 1 int4 nibbles (split halves, packing.py) minus ``offset``; 2 one byte
per value through a 256-entry table (fp8); 3 fp16 values (two bytes, converted in
registers). Kinds 0-2 carry an fp16 scale per token-head, read through a 65,536-entry
table, and int4 an fp16 zero where asymmetric.

Float flags: reassociation and contraction only (vectorised dot products); no finite-math
assumption, since the softmax keeps -inf maxima, and no reciprocal for division, since the
codes written must be the format's own (``x / s`` rounded half to even, as torch.round).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_FAST = {"reassoc", "contract", "nsz"}  # no finite-math: softmax maxima may be -inf
_OPTS = dict(fastmath=_FAST, cache=True, nogil=True)


@njit(inline="always", fastmath=_FAST)
def _row(row, kind, offset, table, half, out, out_bits, D):
    """One stored row (bytes) -> out (D,) fp32 codes (values for fp8 and fp16); out_bits
    is ``out`` viewed as uint32. fp16 converts in registers: its sign, exponent and
    mantissa shifted into fp32's places, times 2^112 to re-bias the exponent (exact for
    normal and subnormal values; the cache holds no inf or nan)."""
    if kind == 0:
        for d in range(D):
            out[d] = np.float32(np.int8(row[d]))
    elif kind == 1:
        P = D // 2
        off = np.float32(offset)
        for j in range(P):  # uint8 lanes throughout: 64 codes per AVX-512 op
            out[j] = np.float32(row[j] & np.uint8(15)) - off
        for j in range(P):
            out[j + P] = np.float32(row[j] >> np.uint8(4)) - off
    elif kind == 2:
        for d in range(D):
            out[d] = table[row[d]]
    else:
        for d in range(D):
            h = np.uint32(row[2 * d]) | (np.uint32(row[2 * d + 1]) << 8)
            out_bits[d] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
        for d in range(D):
            out[d] *= np.float32(5.192296858534828e33)  # 2^112


@njit(inline="always", fastmath=_FAST)
def _exp(x, n, bits):
    """x[:n] = exp(x[:n]) for x <= 0, in one vectorisable loop (math.exp is a libm call
    per element): 2^k from the exponent bits (``bits`` is a uint32 view of an (n,) fp32
    scratch), e^r by a degree-6 polynomial on |r| <= ln2/2; relative error ~2e-7."""
    two_k = bits.view(np.float32)
    for i in range(n):
        v = max(x[i], np.float32(-87.0))
        k = np.float32(math.floor(v * np.float32(1.4426950408889634) + np.float32(0.5)))
        r = v - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1)
        p = p * r + np.float32(1)
        bits[i] = np.uint32(np.int32(k) + 127) << 23
        x[i] = p * two_k[i]


@njit(inline="always", fastmath=_FAST)
def _attend_item(qh, kd, ks, kz, vd, vs, vz, table, half, s, h, b0, b1, L, blocks, sm,
                 kind, offset, m, lsum, acc):
    """Blocks [b0, b1) of sequence s, KV head h, for the G queries qh (G, D): leaves the
    online softmax's maxima m (G,), sums lsum (G,) and unnormalised output acc (G, D).

    Each stored row is converted once, in registers and one small buffer, for all G
    queries; the K scale (and zero) applies per token after the dot; a block's scores go
    through ``_exp`` in one loop; the V scale rides on the weights and the V zero is added
    once per block (Σ_t p_t z_t), not once per token. (Measured, one thread: converting a
    whole block into a (B, D) tile first was 2x slower; a one-pass convert-and-dot for a
    single query no faster.)"""
    G, D = qh.shape
    B = kd.shape[2]
    has_scale = ks.size > 0
    has_zero = kz.size > 0
    qsum = np.zeros(G, np.float32)
    if has_zero:
        for g in range(G):
            for d in range(D):
                qsum[g] += qh[g, d]
    m[:] = -np.inf
    lsum[:] = 0
    acc[:, :] = 0
    sc = np.empty((G, B), np.float32)
    row = np.empty(D, np.float32)
    row_bits = row.view(np.uint32)
    exp_bits = np.empty(B, np.uint32)
    for bi in range(b0, b1):
        blk = blocks[bi]
        n = min(B, L - bi * B)
        for t in range(n):
            ksc = sm * half[ks[blk, h, t]] if has_scale else sm
            kzt = sm * half[kz[blk, h, t]] if has_zero else np.float32(0)
            _row(kd[blk, h, t], kind, offset, table, half, row, row_bits, D)
            for g in range(G):
                dot = np.float32(0)
                for d in range(D):
                    dot += qh[g, d] * row[d]
                sc[g, t] = ksc * dot + kzt * qsum[g]
        for g in range(G):  # online softmax: rescale to the block's new maximum
            mx = m[g]
            for t in range(n):
                mx = max(mx, sc[g, t])
            alpha = math.exp(m[g] - mx) if m[g] > -np.inf else np.float32(0)
            m[g] = mx
            for t in range(n):
                sc[g, t] -= mx
            _exp(sc[g], n, exp_bits)
            total = np.float32(0)
            for t in range(n):
                total += sc[g, t]
            lsum[g] = lsum[g] * alpha + total
            for d in range(D):
                acc[g, d] *= alpha
        if has_zero:  # the V zero: Σ_t p_t z_t once per block and query
            for g in range(G):
                zsum = np.float32(0)
                for t in range(n):
                    zsum += sc[g, t] * half[vz[blk, h, t]]
                for d in range(D):
                    acc[g, d] += zsum
        for t in range(n):  # values: the V scale rides on the weights
            vsc = half[vs[blk, h, t]] if has_scale else np.float32(1)
            _row(vd[blk, h, t], kind, offset, table, half, row, row_bits, D)
            for g in range(G):
                w = sc[g, t] * vsc
                for d in range(D):
                    acc[g, d] += w * row[d]


@njit(inline="always", fastmath=_FAST)
def _merge(part_m, part_l, part_o, first, splits, out):
    """Items [first, first + splits) of one (sequence, head) -> out (G, D) normalised."""
    G, D = out.shape
    for g in range(G):
        mx = -np.inf
        for p in range(splits):
            mx = max(mx, part_m[first + p, g])
        tot = np.float32(0)
        out[g, :] = 0
        for p in range(splits):
            i = first + p
            if part_m[i, g] == -np.inf:
                continue
            f = math.exp(part_m[i, g] - mx)
            tot += part_l[i, g] * f
            for d in range(D):
                out[g, d] += f * part_o[i, g, d]
        inv = np.float32(1) / tot
        for d in range(D):
            out[g, d] *= inv


@njit(inline="always", fastmath=_FAST)
def _attend(q, kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, table, half, splits):
    """q (S, Hkv, G, D) fp32 codes' basis -> (S, Hkv, G, D) fp32 codes' basis."""
    S, Hkv, G, D = q.shape
    B = kd.shape[2]
    n_items = S * Hkv * splits
    part_m = np.empty((n_items, G), np.float32)
    part_l = np.empty((n_items, G), np.float32)
    part_o = np.empty((n_items, G, D), np.float32)
    for item in prange(n_items):
        s, h, part = item // (Hkv * splits), (item // splits) % Hkv, item % splits
        L = lens[s]
        nblk = (L + B - 1) // B
        per = (nblk + splits - 1) // splits
        _attend_item(q[s, h], kd, ks, kz, vd, vs, vz, table, half, s, h, part * per,
                     min(nblk, (part + 1) * per), L, tables[s], sm, kind, offset,
                     part_m[item], part_l[item], part_o[item])
    out = np.empty((S, Hkv, G, D), np.float32)
    for sh in prange(S * Hkv):
        _merge(part_m, part_l, part_o, sh * splits, splits, out[sh // Hkv, sh % Hkv])
    return out


@njit(inline="always", fastmath=_FAST)
def _fwht(x, n, tmp):
    """x (D,) in place: x @ R for hadamard.py's R (normalised Sylvester blocks of n).

    Constant geometry: log2(n) times y[i] = x[2i] + x[2i+1], y[i + n/2] = x[2i] - x[2i+1]
    gives the Sylvester order; every stage is one vectorisable loop (the textbook
    in-place butterflies are not, at their short strides). tmp: (n,) scratch."""
    D = x.shape[0]
    h = n // 2
    norm = np.float32(1.0 / math.sqrt(n))
    for base in range(0, D, n):
        src, dst = x[base:base + n], tmp
        stages = 0
        while (1 << stages) < n:
            for i in range(h):
                a, b = src[2 * i], src[2 * i + 1]
                dst[i] = a + b
                dst[i + h] = a - b
            src, dst = dst, src
            stages += 1
        for j in range(n):
            x[base + j] = src[j] * norm


@njit(inline="always")
def _half_bits(x, buf, bits):
    """fp32 x -> fp16 bits (uint16), rounded half to even as torch's .to(float16)."""
    buf[0] = x
    f = np.uint32(bits[0])
    sign = np.uint32((f >> 16) & 0x8000)
    f &= np.uint32(0x7FFFFFFF)
    if f >= np.uint32(0x47800000):  # overflow (and inf, nan)
        h = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif f < np.uint32(0x38800000):  # fp16 subnormal: scale, round half to even
        buf[0] = abs(x) * np.float32(16777216.0)
        h = np.uint32(np.rint(buf[0]))
    else:
        h = (f + np.uint32(0xC8000FFF) + ((f >> 13) & 1)) >> 13
    return np.uint16(sign | (h & 0xFFFF))


@njit(inline="always", fastmath=_FAST)
def _rope(x, cos, sin):
    """x (D,) in place: x * cos + rotate_half(x) * sin (sin signed as layers.cos_sin)."""
    half = x.shape[0] // 2
    for d in range(half):
        a, b = x[d], x[d + half]
        x[d] = a * cos[d] + b * sin[d]
        x[d + half] = b * cos[d + half] + a * sin[d + half]


@njit(inline="always")
def _write(x, kind, offset, qmax, symmetric, data, scale, zero, blk, h, off, half, buf, bits):
    """x (D,) fp32 in the storage basis -> codes (and scale, zero) at (blk, h, off): the
    arithmetic of IntFormat.quantize_storage / FloatFormat, to the bit."""
    D = x.shape[0]
    if kind == 3:  # fp16 values, clamped to its finite range as FloatFormat does
        for d in range(D):
            hb = _half_bits(min(max(x[d], np.float32(-65504.0)), np.float32(65504.0)), buf,
                            bits)
            data[blk, h, off, 2 * d] = np.uint8(hb & 0xFF)
            data[blk, h, off, 2 * d + 1] = np.uint8(hb >> 8)
        return
    if symmetric:
        amax = np.float32(0)
        for d in range(D):
            amax = max(amax, abs(x[d]))
        sb = _half_bits(min(max(amax / np.float32(qmax), np.float32(2.0**-14)),
                            np.float32(65504.0)), buf, bits)
        zf = np.float32(0)
        lo_code, hi_code = -qmax, qmax
    else:
        lo, hi = x[0], x[0]
        for d in range(D):
            lo = min(lo, x[d])
            hi = max(hi, x[d])
        sb = _half_bits(min(max((hi - lo) / np.float32(qmax), np.float32(2.0**-14)),
                            np.float32(65504.0)), buf, bits)
        zb = _half_bits(lo, buf, bits)
        zero[blk, h, off] = zb
        zf = half[zb]
        lo_code, hi_code = 0, qmax
    scale[blk, h, off] = sb
    sf = half[sb]
    if kind == 0:
        for d in range(D):
            c = min(max(np.rint((x[d] - zf) / sf), lo_code), hi_code)
            data[blk, h, off, d] = np.uint8(np.int32(c) & 0xFF)
    else:
        P = D // 2
        for j in range(P):
            c0 = np.int32(min(max(np.rint((x[j] - zf) / sf), lo_code), hi_code)) + offset
            c1 = np.int32(min(max(np.rint((x[j + P] - zf) / sf), lo_code), hi_code)) + offset
            data[blk, h, off, j] = np.uint8(c0 | (c1 << 4))


def _decode_layer(qkv, cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs, vz, tables, lens, sm,
                 kind, offset, qmax, symmetric, table, half, splits):
    """qkv (S, Hq + 2 Hkv, D) fp32 from the projection, original basis, no RoPE; cos, sin
    (S, D) fp32; rot: the rotation's block size (0: none); wblk, woff (S,) int64: the new
    token's block and offset. Writes the new k, v; returns (S, Hq, D) fp32 attention output
    in the original basis. The stores' arrays are uint8 / uint16 views (cpu_jit.py)."""
    S, H3, D = qkv.shape
    Hkv = kd.shape[1]
    Hq = H3 - 2 * Hkv
    G = Hq // Hkv
    q = np.empty((S, Hkv, G, D), np.float32)
    for sh in prange(S * (Hkv + 1)):  # per token: q heads, then each KV head's k and v
        s, j = sh // (Hkv + 1), sh % (Hkv + 1)
        buf = np.empty(1, np.float32)
        bits = buf.view(np.uint32)
        tmp = np.empty(D, np.float32)
        if j == Hkv:
            for hq in range(Hq):
                x = q[s, hq // G, hq % G]
                x[:] = qkv[s, hq]
                _rope(x, cos[s], sin[s])
                if rot:
                    _fwht(x, rot, tmp)
            continue
        k = np.empty(D, np.float32)
        k[:] = qkv[s, Hq + j]
        _rope(k, cos[s], sin[s])
        v = np.empty(D, np.float32)
        v[:] = qkv[s, Hq + Hkv + j]
        if rot:
            _fwht(k, rot, tmp)
            _fwht(v, rot, tmp)
        _write(k, kind, offset, qmax, symmetric, kd, ks, kz, wblk[s], j, woff[s], half, buf,
               bits)
        _write(v, kind, offset, qmax, symmetric, vd, vs, vz, wblk[s], j, woff[s], half, buf,
               bits)
    out = _attend(q, kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, table, half,
                  splits)
    if rot:
        for sh in prange(S * Hq):
            tmp = np.empty(D, np.float32)
            _fwht(out[sh // Hq, (sh % Hq) // G, sh % G], rot, tmp)
    return out.reshape(S, Hq, D)


# Compiled parallel even for one thread: numba marks a parallel loop's arrays as not
# aliasing, and LLVM vectorises the dot products only then (measured: a serial twin of
# decode_layer took 516 us where this takes 328, 16 sequences x 100 tokens, one thread).
attend = njit(parallel=True, **_OPTS)(_attend.py_func)
decode_layer = njit(parallel=True, **_OPTS)(_decode_layer)
