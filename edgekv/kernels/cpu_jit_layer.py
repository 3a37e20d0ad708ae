"""A whole decoder layer for one decoding sequence, compiled (numba; imported by cpu_jit.py).

At batch 1 a decode step reads every weight once and does almost nothing else, yet the
torch path spends more time around its 17 matmuls than in them: each of ~100 small ops and
module calls runs cold, its code and data evicted by the weights streaming through the
caches. Here a layer is one call:

    h = rms(x) * ln1;  qkv = Wqkv h [+ b]            matrix-vector, rows over threads
    o = decode_layer(qkv)                            RoPE, rotation, write, attention
    x += Wo o [+ b];  h = rms(x) * ln2
    g, u = Wgu h [+ b];  x += Wd (silu(g) * u) [+ b]

The matrix-vector products stream each weight once, in whichever layout it lies
(layers.transpose_for_cpu): ``gemv`` over (in, out) memory, ``gemv_rows`` over (out, in),
both about as fast as torch's on one thread. For 2-16 sequences of a model whose weights
stream from memory, ``small_linear`` reads each (out, in) row once per 4 inputs: 1.6x
torch's GEMM at 8 rows of Qwen2.5-0.5B's matrices (10.4 against 6.4 GB/s), 1.2x at 16;
for a model small enough to stay in the caches torch's GEMM over (in, out) memory wins
(models/cpu_fused.py picks).
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


@njit(parallel=True, **_OPTS)
def gemv_rows(x, w, b, out):
    """out (N,) = w (N, K) @ x (K,) [+ b (N,), empty for none]: the weight as nn.Linear
    stores it, one vectorised dot per row, rows over threads."""
    N, K = w.shape
    has_b = b.size > 0
    for n in prange(N):
        acc = np.float32(0)
        for k in range(K):
            acc += w[n, k] * x[k]
        out[n] = acc + b[n] if has_b else acc


@njit(inline="always", fastmath=_FAST)
def _tile4x4(x, w, s, n, out):
    """out[s:s+4, n:n+4] = x[s:s+4] @ w[n:n+4]^T: sixteen dot products in one pass over
    K, each loaded input and weight vector used four times."""
    K = x.shape[1]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0)
    for k in range(K):
        w0, w1, w2, w3 = w[n, k], w[n + 1, k], w[n + 2, k], w[n + 3, k]
        x0, x1, x2, x3 = x[s, k], x[s + 1, k], x[s + 2, k], x[s + 3, k]
        a00 += x0 * w0
        a01 += x0 * w1
        a02 += x0 * w2
        a03 += x0 * w3
        a10 += x1 * w0
        a11 += x1 * w1
        a12 += x1 * w2
        a13 += x1 * w3
        a20 += x2 * w0
        a21 += x2 * w1
        a22 += x2 * w2
        a23 += x2 * w3
        a30 += x3 * w0
        a31 += x3 * w1
        a32 += x3 * w2
        a33 += x3 * w3
    out[s, n], out[s, n + 1], out[s, n + 2], out[s, n + 3] = a00, a01, a02, a03
    out[s + 1, n], out[s + 1, n + 1], out[s + 1, n + 2], out[s + 1, n + 3] = a10, a11, a12, a13
    out[s + 2, n], out[s + 2, n + 1], out[s + 2, n + 2], out[s + 2, n + 3] = a20, a21, a22, a23
    out[s + 3, n], out[s + 3, n + 1], out[s + 3, n + 2], out[s + 3, n + 3] = a30, a31, a32, a33


@njit(inline="always", fastmath=_FAST)
def _tile1x4(x, w, s, n, out):
    """out[s, n:n+4] = x[s] @ w[n:n+4]^T (the rows left over from 4 x 4 tiles)."""
    K = x.shape[1]
    a0 = a1 = a2 = a3 = np.float32(0)
    for k in range(K):
        xs = x[s, k]
        a0 += xs * w[n, k]
        a1 += xs * w[n + 1, k]
        a2 += xs * w[n + 2, k]
        a3 += xs * w[n + 3, k]
    out[s, n], out[s, n + 1], out[s, n + 2], out[s, n + 3] = a0, a1, a2, a3


@njit(parallel=True, **_OPTS)
def small_linear(x, w, b):
    """(S, N) = x (S, K) @ w (N, K)^T [+ b (N,), empty for none], for a few rows. Tiles
    of 4 rows x 4 outputs: each weight row is read once per 4 inputs and each load feeds
    four products (torch's GEMM at 2-8 rows reads at 5-8 GB/s on one thread; measured on
    the demo model's matrices, weights cold: 1.4x torch at 8 rows, 1.3x at 4)."""
    S, K = x.shape
    N = w.shape[0]
    out = np.empty((S, N), np.float32)
    for nt in prange((N + 3) // 4):
        n = nt * 4
        if n + 4 <= N:
            s = 0
            while s + 4 <= S:
                _tile4x4(x, w, s, n, out)
                s += 4
            while s < S:
                _tile1x4(x, w, s, n, out)
                s += 1
        else:
            for j in range(n, N):
                for s in range(S):
                    acc = np.float32(0)
                    for k in range(K):
                        acc += x[s, k] * w[j, k]
                    out[s, j] = acc
        if b.size > 0:
            for j in range(n, min(n + 4, N)):
                for s in range(S):
                    out[s, j] += b[j]
    return out


@njit(inline="always", fastmath=_FAST)
def _rms(x, w, eps, out):
    H = x.shape[0]
    ss = np.float32(0)
    for j in range(H):
        ss += x[j] * x[j]
    r = np.float32(1) / np.float32(math.sqrt(ss / np.float32(H) + eps))
    for j in range(H):
        out[j] = x[j] * r * w[j]


@njit(inline="always")
def _matvec(x, w, b, out, transposed):
    if transposed:
        gemv(x, w, b, out)
    else:
        gemv_rows(x, w, b, out)


@njit(**_OPTS)
def layer(x, ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd, transposed, eps, cos, sin, rot,
          wblk, woff, kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, qmax, symmetric,
          table, half, splits):
    """x (H,) fp32 residual stream of the one sequence, updated in place; the weights fp32
    as they lie in memory: (in, out) where ``transposed`` (layers.transpose_for_cpu), else
    (out, in); biases (out,) or empty; cos, sin (1, D); the rest as decode_layer's. Writes
    the new k, v into the stores."""
    H = x.shape[0]
    D = cos.shape[1]
    h = np.empty(H, np.float32)
    _rms(x, ln1, eps, h)
    qkv = np.empty(wqkv.shape[1] if transposed else wqkv.shape[0], np.float32)
    _matvec(h, wqkv, bqkv, qkv, transposed)
    o = decode_layer(qkv.reshape(1, -1, D), cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs,
                     vz, tables, lens, sm, kind, offset, qmax, symmetric, table, half, splits,
                     np.full(1, -1, np.int32), np.zeros(1, np.int32),
                     np.empty((0, 1), np.int32), np.empty(0, np.int32),
                     np.empty(0, np.int32), np.int64(1))  # one sequence shares nothing
    # (np.int64(1), not 1: a literal argument would compile decode_layer a second time)
    a = np.empty(H, np.float32)
    _matvec(o.reshape(-1), wo, bo, a, transposed)
    for j in range(H):
        x[j] += a[j]
    _rms(x, ln2, eps, h)
    gu = np.empty(wgu.shape[1] if transposed else wgu.shape[0], np.float32)
    _matvec(h, wgu, bgu, gu, transposed)
    n = gu.shape[0] // 2
    act = np.empty(n, np.float32)
    for j in range(n):
        g = gu[j]
        act[j] = g / (np.float32(1) + np.float32(math.exp(-g))) * gu[n + j]
    _matvec(act, wd, bd, a, transposed)
    for j in range(H):
        x[j] += a[j]
