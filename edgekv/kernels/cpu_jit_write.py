"""The compiled write side of the CPU decode path (numba; used by cpu_jit_loops.py's
decode layer and by cpu_jit.write_codebook_rows): RoPE, the format's rotation (a fast
Walsh-Hadamard transform), and quantize-and-write of one head-vector into its block, for
every storage kind, the codes exactly the format's own.

Storage kinds (cpu_jit.KIND_*), every one passed as bytes so one compiled function serves
all: 0 int8 codes; 1 int4 nibbles (split halves, packing.py) minus ``offset``; 2 one byte
per value through a 256-entry table (fp8); 3 fp16 values (two bytes, converted in
registers); 4 codebook nibbles (split halves) through the format's 16 levels, looked up in
registers (cpu_jit_lut.py), times an e4m3 scale per group of values (quant/codebook.py).
Kinds 0-2 carry an fp16 scale per token-head, read through a 65,536-entry table, and int4
an fp16 zero where asymmetric; kind 4's scale arrays hold a row's group scale bytes one
after another, as uint16 pairs (B x groups / 2 per head: the same compiled array type as
fp16 scales), decoded through a 256-entry table once per block.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_FAST = {"reassoc", "contract", "nsz"}  # no finite-math: softmax maxima may be -inf
_OPTS = dict(fastmath=_FAST, cache=True, nogil=True)


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
def _write(x, kind, offset, qmax, symmetric, data, scale, zero, blk, h, off, half, buf, bits,
           table):
    """x (D,) fp32 in the storage basis -> codes (and scale, zero) at (blk, h, off): the
    arithmetic of IntFormat.quantize_storage / FloatFormat, to the bit, and of
    CodebookFormat.quantize_storage (``_write_codebook``)."""
    D = x.shape[0]
    if kind == 4:
        _write_codebook(x, data, scale, blk, h, off, table)
        return
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


@njit(inline="always")
def _e4m3_byte(raw, table):
    """fp32 -> its signed e4m3 byte (round to nearest even), magnitude clamped to
    [2^-9, 448] (codebook.signed_scale): a binary search in the decoded bytes
    table[36:163] (byte 0..126, increasing)."""
    a = min(max(abs(raw), np.float32(2.0**-9)), np.float32(448.0))
    b = 1
    for step in (64, 32, 16, 8, 4, 2, 1):
        if b + step <= 126 and table[36 + b + step] <= a:
            b += step
    if b < 126:
        mid = (table[36 + b] + table[37 + b]) * np.float32(0.5)  # exact: 5 significant bits
        if a > mid or (a == mid and b & 1):
            b += 1
    return b | 128 if raw < 0 else b


@njit(inline="always")
def _write_codebook(x, data, scale, blk, h, off, table):
    """x (D,) fp32, storage basis -> codebook nibbles and signed e4m3 group scales at
    (blk, h, off), as CodebookFormat.quantize_storage: per group, of the candidates
    (extreme x factor, then its least-squares refit, for each factor; each rounded to
    e4m3) the one of least squared error (the first on a tie), each code the number of
    midpoints below x / s. ``scale`` holds the bytes as uint16 pairs (little-endian);
    table: 16 levels, 15 midpoints, 5 polynomial coefficients, 256 decoded e4m3 bytes,
    the factors. A candidate equal to one already tried is skipped (it cannot win), and
    so is its refit where that was tried too: of the 64, ~10-20 are distinct.
    The errors and refit sums are summed in another order than torch's: a group whose two
    best candidates tie to the last bits may take the other one (same error to ~1e-7)."""
    D = x.shape[0]
    ng = 2 * scale.shape[2] // data.shape[2]
    GS = D // ng
    P = D // 2
    nf = table.shape[0] - 292
    codes = np.empty(D, np.uint8)
    tried = np.zeros(256, np.int32)  # byte -> 2 gi + 2 tried with its refit, 2 gi + 1 alone
    for gi in range(ng):
        d0 = gi * GS
        ext = x[d0]
        for d in range(d0, d0 + GS):
            if abs(x[d]) > abs(ext):
                ext = x[d]
        best, best_b = np.float32(np.inf), 0
        for fi in range(nf):
            raw = ext * table[292 + fi]
            for r in range(2):  # the candidate, then its least-squares refit
                b = _e4m3_byte(raw, table)
                if tried[b] >= 2 * gi + 2 - r:  # tried (as a candidate: with its refit)
                    break
                tried[b] = 2 * gi + 2 - r
                sc = table[36 + b]
                err, num, den = np.float32(0), np.float32(0), np.float32(0)
                for d in range(d0, d0 + GS):
                    lv = table[_bucket(x[d] / sc, table)]
                    e = x[d] - lv * sc
                    err += e * e
                    num += x[d] * lv
                    den += lv * lv
                if err < best:
                    best, best_b = err, b
                raw = num / max(den, np.float32(1e-30))
        i = off * ng + gi  # the byte, into its uint16 word
        sh = (i & 1) << 3
        w = np.uint16(scale[blk, h, i >> 1] & ~(0xFF << sh))
        scale[blk, h, i >> 1] = np.uint16(w | (best_b << sh))
        sc = table[36 + best_b]
        for d in range(d0, d0 + GS):
            codes[d] = _bucket(x[d] / sc, table)
    for j in range(P):
        data[blk, h, off, j] = codes[j] | (codes[j + P] << 4)


@njit(inline="always")
def _bucket(y, table):
    """The number of level midpoints (table[16:31], increasing) strictly below y."""
    c = 0
    if y > table[23]:
        c = 8
    if y > table[19 + c]:
        c += 4
    if y > table[17 + c]:
        c += 2
    if y > table[16 + c]:
        c += 1
    return c


def _write_codebook_rows(x, data, scale, table):
    """x (N, D) fp32 in the storage basis -> each row's codebook nibbles into data
    (N, 1, 1, D / 2) and its e4m3 group scales into scale (N, 1, groups / 2) (uint16
    pairs), as ``_write_codebook``: a prefill's write (the format's torch search of its
    candidates took ~15 s for the demo model's 1,000-token prompt, this ~0.1 s)."""
    for n in prange(x.shape[0]):
        _write_codebook(x[n], data, scale, n, 0, 0, table)


write_codebook_rows = njit(parallel=True, **_OPTS)(_write_codebook_rows)
