"""A whole decoder layer for one decoding sequence, compiled (numba; imported by cpu_jit.py).

At batch 1 a decode step reads every weight once and does almost nothing else, yet the
torch path spends more time around its 17 matmuls than in them: each of ~100 small ops and
module calls runs cold, its code and data evicted by the weights streaming through the
caches. Here a layer is one call:

    h = rms(x) * ln1;  qkv = Wqkv h [+ b]            matrix-vector, rows over threads
    o = decode_layer(qkv)                            RoPE, rotation, write, attention
    x += Wo o [+ b];  h = rms(x) * ln2
    g, u = Wgu h [+ b];  x += Wd (silu(g) * u) [+ b]

The matrix-vector products stream each weight once (``gemv``: measured 0.78 ms for the
demo model's 16 layer matrices, as fast as torch's); with more sequences torch's GEMM takes
them (models/cpu_fused.py runs the layers either way).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .cpu_jit_loops import _FAST, _OPTS, decode_layer


@njit(parallel=True, **_OPTS)
def gemv(x, wt, b, out):
    """out (N,) = x (K,) @ wt (K, N) [+ b (N,), empty for none]: the weight as it lies in
    memory (layers.cpu_layout: an (out, in) Linear weight stored (in, out)). Columns in
    chunks over threads; a chunk's sums stay in one small buffer while four rows of the
    weight stream past (measured as fast as a dot per row on the demo model, 1.1x on
    Qwen2.5-0.5B's matrices)."""
    K, N = wt.shape
    has_b = b.size > 0
    C = 256  # columns per chunk; at least 8 chunks (for the threads) where N allows
    while C > 64 and (N + C - 1) // C < 8:
        C //= 2
    for c in prange((N + C - 1) // C):
        n0 = c * C
        w = min(C, N - n0)
        acc = np.zeros(C, np.float32)
        k = 0
        while k + 4 <= K:
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            r0, r1 = wt[k, n0:n0 + w], wt[k + 1, n0:n0 + w]
            r2, r3 = wt[k + 2, n0:n0 + w], wt[k + 3, n0:n0 + w]
            for j in range(w):
                acc[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j]
            k += 4
        while k < K:
            xk, r = x[k], wt[k, n0:n0 + w]
            for j in range(w):
                acc[j] += xk * r[j]
            k += 1
        for j in range(w):
            out[n0 + j] = acc[j] + b[n0 + j] if has_b else acc[j]


@njit(inline="always", fastmath=_FAST)
def _rms(x, w, eps, out):
    H = x.shape[0]
    ss = np.float32(0)
    for j in range(H):
        ss += x[j] * x[j]
    r = np.float32(1) / np.float32(math.sqrt(ss / np.float32(H) + eps))
    for j in range(H):
        out[j] = x[j] * r * w[j]


@njit(**_OPTS)
def layer(x, ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd, eps, cos, sin, rot, wblk, woff,
          kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, qmax, symmetric, table,
          half, splits):
    """x (H,) fp32 residual stream of the one sequence, updated in place; the weights as
    they lie in memory, (in, out) fp32 (layers.cpu_layout), biases (out,) or empty; cos,
    sin (1, D); the rest as decode_layer's. Writes the new k, v into the stores."""
    H = x.shape[0]
    D = cos.shape[1]
    h = np.empty(H, np.float32)
    _rms(x, ln1, eps, h)
    qkv = np.empty(wqkv.shape[1], np.float32)
    gemv(h, wqkv, bqkv, qkv)
    o = decode_layer(qkv.reshape(1, -1, D), cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs,
                     vz, tables, lens, sm, kind, offset, qmax, symmetric, table, half, splits)
    a = np.empty(H, np.float32)
    gemv(o.reshape(-1), wo, bo, a)
    for j in range(H):
        x[j] += a[j]
    _rms(x, ln2, eps, h)
    gu = np.empty(wgu.shape[1], np.float32)
    gemv(h, wgu, bgu, gu)
    n = gu.shape[0] // 2
    act = np.empty(n, np.float32)
    for j in range(n):
        g = gu[j]
        act[j] = g / (np.float32(1) + np.float32(math.exp(-g))) * gu[n + j]
    gemv(act, wd, bd, a)
    for j in range(H):
        x[j] += a[j]
