"""The compiled loop nests of the CPU decode path (numba; imported only by cpu_jit.py).

Two kernels, both parallel over work items and exact in their own arithmetic:

``attend``       one new query per sequence over its paged history, read as stored: per
                 (sequence, KV head, split) a walk over the blocks with an online softmax;
                 every row's codes are converted in registers and used by the head group's
                 G queries, four rows at a time; splits of one history merge by their
                 maxima and sums. Blocks that several sequences share (a common system
                 prompt, found by cpu_plan.shared_prefixes) are walked once per KV head
                 for all of their queries, and merged into each sequence's own part.
``decode_layer`` a decode layer's whole attention step after the qkv projection: RoPE of q
                 and k, the format's rotation (a fast Walsh-Hadamard transform, not a
                 matmul), quantize-and-write of k and v into their slots, ``attend``'s loop
                 over the history, the output rotated back. One call where the torch path
                 dispatches ~40 ops.

Storage kinds: cpu_jit_write.py lists them (reads and writes take the same).

Float flags: reassociation and contraction only (vectorised dot products); no finite-math
assumption, since the softmax keeps -inf maxima, and no reciprocal for division, since the
codes written must be the format's own (``x / s`` rounded half to even, as torch.round).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .cpu_jit_lut import lut16
from .cpu_jit_write import _FAST, _OPTS, _fwht, _rope, _write


@njit(inline="always", fastmath=_FAST)
def _row(row, kind, offset, table, half, out, out_bits, D, t0, ng, sv):
    """One stored row (bytes) -> out (D,) fp32 codes (values for fp8, fp16 and the
    codebook, whose ``ng`` group scales it reads decoded at sv[t0 : t0 + ng]);
    out_bits is ``out`` viewed as uint32. fp16 converts in registers: its sign, exponent
    and mantissa shifted into fp32's places, times 2^112 to re-bias the exponent (exact
    for normal and subnormal values; the cache holds no inf or nan)."""
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
    elif kind == 4:  # table[0:16] by lookup (cpu_jit_lut), times the group's scale
        P = D // 2
        GS = D // ng
        h2 = ng // 2  # group gi's low nibbles; group gi + ng / 2's high nibbles
        for gi in range(h2):  # (no division per group: a runtime idiv costs ~3 ns)
            s_lo, s_hi = sv[t0 + gi], sv[t0 + gi + h2]
            for j in range(gi * GS, gi * GS + GS, 16):
                lut16(table, row, j, 0, s_lo, out, j)
                lut16(table, row, j, 4, s_hi, out, j + P)
    else:
        for d in range(D):
            h = np.uint32(row[2 * d]) | (np.uint32(row[2 * d + 1]) << 8)
            out_bits[d] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
        for d in range(D):
            out[d] *= np.float32(5.192296858534828e33)  # 2^112


# From this many queries per KV head, rows are converted four at a time: four dots per
# query load, four rows per accumulator update (measured, one thread: 16 sequences x 560
# tokens, G 4, D 128: 10-20% faster; 4 x 4K, G 1, D 64: 5-9% slower than one at a time)
FOUR_ROWS_MIN_G = 2


@njit(inline="always", fastmath=_FAST)
def _row4(row, kind, offset, table, half, i, r0, r1, r2, r3, b0, b1, b2, b3, D, t0, ng, sv):
    """``_row`` into the i-th of four buffers."""
    if i == 0:
        _row(row, kind, offset, table, half, r0, b0, D, t0, ng, sv)
    elif i == 1:
        _row(row, kind, offset, table, half, r1, b1, D, t0, ng, sv)
    elif i == 2:
        _row(row, kind, offset, table, half, r2, b2, D, t0, ng, sv)
    else:
        _row(row, kind, offset, table, half, r3, b3, D, t0, ng, sv)


@njit(inline="always")
def _group_scales(sc, blk, h, count, table, sv):
    """sv[:count] = the e4m3 bytes 0 .. count of sc[blk, h] (uint16 pairs, little-endian)
    decoded through table[36:292]: a block's group scales, once per block."""
    for w in range(count // 2):  # count is even: an even number of groups per row
        word = sc[blk, h, w]
        sv[2 * w] = table[36 + (word & 255)]
        sv[2 * w + 1] = table[36 + (word >> 8)]


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
    has_scale = ks.size > 0 and kind != 4  # a scale per token-head, applied after the dot
    has_zero = kz.size > 0
    ng = 2 * ks.shape[2] // B if kind == 4 else 0  # kind 4: a byte scale per group
    qsum = np.zeros(G, np.float32)
    if has_zero:
        for g in range(G):
            for d in range(D):
                qsum[g] += qh[g, d]
    m[:] = -np.inf
    lsum[:] = 0
    acc[:, :] = 0
    sc = np.empty((G, B), np.float32)
    r0 = np.zeros(D, np.float32)  # four rows at a time: four dots per query load
    r1 = np.zeros(D, np.float32)
    r2 = np.zeros(D, np.float32)
    r3 = np.zeros(D, np.float32)
    b0_, b1_, b2_, b3_ = (r0.view(np.uint32), r1.view(np.uint32), r2.view(np.uint32),
                          r3.view(np.uint32))
    ksc = np.empty(4, np.float32)
    kzt = np.empty(4, np.float32)
    sv = np.empty(B * max(ng, 1), np.float32)  # kind 4: a block's group scales
    exp_bits = np.empty(B, np.uint32)
    for bi in range(b0, b1):
        blk = blocks[bi]
        n = min(B, L - bi * B)
        if ng:
            _group_scales(ks, blk, h, n * ng, table, sv)
        if G < FOUR_ROWS_MIN_G:  # one row at a time
            for t in range(n):
                k_s = sm * half[ks[blk, h, t]] if has_scale else sm
                k_z = sm * half[kz[blk, h, t]] if has_zero else np.float32(0)
                _row(kd[blk, h, t], kind, offset, table, half, r0, b0_, D, t * ng, ng, sv)
                for g in range(G):
                    dot = np.float32(0)
                    for d in range(D):
                        dot += qh[g, d] * r0[d]
                    sc[g, t] = k_s * dot + k_z * qsum[g]
        for t0 in range(0, n if G >= FOUR_ROWS_MIN_G else 0, 4):
            r = min(4, n - t0)
            for i in range(r):
                t = t0 + i
                ksc[i] = sm * half[ks[blk, h, t]] if has_scale else sm
                kzt[i] = sm * half[kz[blk, h, t]] if has_zero else np.float32(0)
                _row4(kd[blk, h, t], kind, offset, table, half, i, r0, r1, r2, r3, b0_,
                      b1_, b2_, b3_, D, t * ng, ng, sv)
            for g in range(G):
                a0 = np.float32(0)
                a1 = np.float32(0)
                a2 = np.float32(0)
                a3 = np.float32(0)
                for d in range(D):
                    x = qh[g, d]
                    a0 += x * r0[d]
                    a1 += x * r1[d]
                    a2 += x * r2[d]
                    a3 += x * r3[d]
                sc[g, t0] = ksc[0] * a0 + kzt[0] * qsum[g]
                if r > 1:
                    sc[g, t0 + 1] = ksc[1] * a1 + kzt[1] * qsum[g]
                if r > 2:
                    sc[g, t0 + 2] = ksc[2] * a2 + kzt[2] * qsum[g]
                if r > 3:
                    sc[g, t0 + 3] = ksc[3] * a3 + kzt[3] * qsum[g]
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
        if ng:
            _group_scales(vs, blk, h, n * ng, table, sv)
        if G < FOUR_ROWS_MIN_G:  # values: the V scale rides on the weights
            for t in range(n):
                v_s = half[vs[blk, h, t]] if has_scale else np.float32(1)
                _row(vd[blk, h, t], kind, offset, table, half, r0, b0_, D, t * ng, ng, sv)
                for g in range(G):
                    w = sc[g, t] * v_s
                    for d in range(D):
                        acc[g, d] += w * r0[d]
        for t0 in range(0, n if G >= FOUR_ROWS_MIN_G else 0, 4):
            r = min(4, n - t0)
            for i in range(r):
                t = t0 + i
                ksc[i] = half[vs[blk, h, t]] if has_scale else np.float32(1)
                _row4(vd[blk, h, t], kind, offset, table, half, i, r0, r1, r2, r3, b0_,
                      b1_, b2_, b3_, D, t * ng, ng, sv)
            for g in range(G):  # a short tail's rows weigh 0 (their values are finite)
                w0 = sc[g, t0] * ksc[0]
                w1 = sc[g, t0 + 1] * ksc[1] if r > 1 else np.float32(0)
                w2 = sc[g, t0 + 2] * ksc[2] if r > 2 else np.float32(0)
                w3 = sc[g, t0 + 3] * ksc[3] if r > 3 else np.float32(0)
                for d in range(D):
                    acc[g, d] += (w0 * r0[d] + w1 * r1[d]) + (w2 * r2[d]
                                                                          + w3 * r3[d])


@njit(inline="always", fastmath=_FAST)
def _merge(pm, pl, po, first, splits, sfirst, ssplits, stride, out, lse):
    """The G rows at ``first`` of each of ``splits`` consecutive parts (G rows apart) and,
    where ``sfirst`` >= 0, those at ``sfirst`` of ``ssplits`` parts ``stride`` rows apart,
    of the parts' maxima pm, sums pl (R,) and outputs po (R, D) -> out (G, D) normalised;
    and, where ``lse`` (G,) has rows, each query's natural log-sum-exp of its scores."""
    G, D = out.shape
    for g in range(G):
        mx = -np.inf
        for p in range(splits):
            mx = max(mx, pm[first + p * G + g])
        for p in range(ssplits if sfirst >= 0 else 0):
            mx = max(mx, pm[sfirst + p * stride + g])
        tot = np.float32(0)
        out[g, :] = 0
        for p in range(splits + (ssplits if sfirst >= 0 else 0)):
            i = first + p * G + g if p < splits else sfirst + (p - splits) * stride + g
            if pm[i] == -np.inf:
                continue
            f = math.exp(pm[i] - mx)
            tot += pl[i] * f
            for d in range(D):
                out[g, d] += f * po[i, d]
        inv = np.float32(1) / tot
        for d in range(D):
            out[g, d] *= inv
        if lse.shape[0] > 0:
            lse[g] = mx + math.log(tot)


@njit(inline="always", fastmath=_FAST)
def _attend(q, kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, table, half, splits,
            gsel, gslot, gmem, gcnt, gblk, gsplits, lse):
    """q (S, Hkv, G, D) fp32 codes' basis -> (S, Hkv, G, D) fp32 codes' basis; and where
    ``lse`` (S, Hkv, G) fp32 has rows, each query's natural log-sum-exp (age tiers merge
    the parts of several storages by it).

    Shared prefixes (cpu_plan.SharedPrefix; none where ``gmem`` has no rows): sequence s
    of group ``gsel[s]`` >= 0 (its member ``gslot[s]``) shares its first ``gblk[g]``
    blocks with the group's other ``gcnt[g]`` members (``gmem[g]``). Each head's shared
    blocks are read once for all the group's queries (an item of gcnt x G rows, cut into
    ``gsplits``), each sequence's own blocks by its own items, and the two merged: the
    stored rows of a shared system prompt are converted once per step, not once per
    sequence. Both kinds of item run in one parallel loop through one call of
    ``_attend_item`` (numba inlines its loop nest once: with a call per kind the kernels
    took twice as long to compile, at the same speed), shared items spread evenly over
    it; each item's maxima, sums and outputs are rows of pm, pl, po."""
    S, Hkv, G, D = q.shape
    B = kd.shape[2]
    NG, M = gmem.shape
    n_items = S * Hkv * splits
    n_shared = NG * Hkv * gsplits
    base = n_items * G  # the parts' rows: each own item's G, then each shared item's M G
    NR = base + n_shared * M * G
    pm = np.empty(NR, np.float32)
    pl = np.empty(NR, np.float32)
    po = np.empty((NR, D), np.float32)
    total = n_items + n_shared
    every = total // max(n_shared, 1)  # shared items spread evenly over the threads
    for pi in prange(total):
        p = np.int64(pi)  # (a prange index may be unsigned: keep the arithmetic signed)
        if n_shared > 0 and p % every == 0 and p // every < n_shared:
            item = p // every  # a group's shared blocks, for all its queries at once
            grp, h, part = item // (Hkv * gsplits), (item // gsplits) % Hkv, item % gsplits
            rows = gcnt[grp] * G
            qx = np.empty((rows, D), np.float32)
            for i in range(gcnt[grp]):
                qx[i * G:(i + 1) * G] = q[gmem[grp, i], h]
            c = gblk[grp]
            per = (c + gsplits - 1) // gsplits
            s = gmem[grp, 0]
            lo, hi, L = part * per, min(c, (part + 1) * per), c * B
            r0 = base + item * M * G
        else:  # a sequence's own blocks (all, outside a group)
            item = p - min(n_shared, (p + every - 1) // every) if n_shared > 0 else p
            s, h, part = item // (Hkv * splits), (item // splits) % Hkv, item % splits
            rows = G
            qx = q[s, h]
            L = lens[s]
            nblk = (L + B - 1) // B
            first = gblk[gsel[s]] if gsel[s] >= 0 else 0
            per = (nblk - first + splits - 1) // splits
            lo, hi = first + part * per, min(nblk, first + (part + 1) * per)
            r0 = item * G
        _attend_item(qx, kd, ks, kz, vd, vs, vz, table, half, s, h, lo, hi, L, tables[s],
                     sm, kind, offset, pm[r0:r0 + rows], pl[r0:r0 + rows],
                     po[r0:r0 + rows])
    out = np.empty((S, Hkv, G, D), np.float32)
    none = np.empty(0, np.float32)
    for sh in prange(S * Hkv):
        s, h = sh // Hkv, sh % Hkv
        g = gsel[s]
        sfirst = base + ((g * Hkv + h) * gsplits * M + gslot[s]) * G if g >= 0 else -1
        _merge(pm, pl, po, sh * splits * G, splits, sfirst, gsplits, M * G, out[s, h],
               lse[s, h] if lse.shape[0] > 0 else none)
    return out


def _decode_layer(qkv, cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs, vz, tables, lens, sm,
                 kind, offset, qmax, symmetric, table, half, splits, gsel, gslot, gmem, gcnt,
                 gblk, gsplits):
    """qkv (S, Hq + 2 Hkv, D) fp32 from the projection, original basis, no RoPE; cos, sin
    (S, D) fp32; rot: the rotation's block size (0: none); wblk, woff (S,) int64: the new
    token's block and offset. Writes the new k, v; returns (S, Hq, D) fp32 attention output
    in the original basis. The stores' arrays are uint8 / uint16 views (cpu_jit.py);
    gsel ... gsplits: the step's shared prefixes, as ``_attend`` takes them."""
    S, H3, D = qkv.shape
    Hkv = kd.shape[1]
    Hq = H3 - 2 * Hkv
    G = Hq // Hkv
    q = np.empty((S, Hkv, G, D), np.float32)
    for sh in prange(S * (2 * Hkv + 1)):  # per token: each new k, each new v, the q heads
        s, j = sh // (2 * Hkv + 1), sh % (2 * Hkv + 1)
        buf = np.empty(1, np.float32)
        bits = buf.view(np.uint32)
        tmp = np.empty(D, np.float32)
        if j == 2 * Hkv:
            for hq in range(Hq):
                x = q[s, hq // G, hq % G]
                x[:] = qkv[s, hq]
                _rope(x, cos[s], sin[s])
                if rot:
                    _fwht(x, rot, tmp)
            continue
        x = np.empty(D, np.float32)
        x[:] = qkv[s, Hq + j]  # k heads, then v heads
        if j < Hkv:
            _rope(x, cos[s], sin[s])
        if rot:
            _fwht(x, rot, tmp)
        # one call site for k and v: each inlined copy of _write costs compile time
        data, scale, zero = (kd, ks, kz) if j < Hkv else (vd, vs, vz)
        _write(x, kind, offset, qmax, symmetric, data, scale, zero, wblk[s], j % Hkv,
               woff[s], half, buf, bits, table)
    # the compiled ``attend`` (one compile serves both; inlined, it doubled this one's)
    out = attend(q, kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, table, half,
                 splits, gsel, gslot, gmem, gcnt, gblk, gsplits, np.empty((0, 1, 1), np.float32))
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
