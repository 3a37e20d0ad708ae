"""A whole decoder layer for one decoding sequence, compiled (numba; imported by cpu_jit.py).

At batch 1 a decode step reads every weight once and does almost nothing else, yet the
torch path spends more time around its 17 matmuls than in them: each of ~100 small ops and
module calls runs cold, its code and data evicted by the weights streaming through the
caches. Here a layer is one call:

    h = rms(x) * ln1;  qkv = Wqkv h [+ b]            matrix-vector, rows over threads
    o = decode_layer(qkv)                            RoPE, rotation, write, attention
    x += Wo o [+ b];  h = rms(x) * ln2
    g, u = Wgu h [+ b];  x += Wd (silu(g) * u) [+ b]

The matrix-vector products stream each weight row once with a vectorised dot (measured
0.87 ms for the demo model's 17 matrices against torch's 0.97 ms, one thread); with more
sequences torch's GEMM wins and the layers run as modules (models/cpu_fused.py decides).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .cpu_jit_loops import _FAST, _OPTS, decode_layer


@njit(parallel=True, **_OPTS)
def gemv(x, w, b, out):
    """out (N,) = w (N, K) @ x (K,) [+ b (N,), empty for none]; rows over threads."""
    N, K = w.shape
    has_b = b.size > 0
    for n in prange(N):
        acc = np.float32(0)
        for k in range(K):
            acc += w[n, k] * x[k]
        out[n] = acc + b[n] if has_b else acc


@njit(parallel=True, **_OPTS)
def small_linear(x, w, b):
    """(S, N) = x (S, K) @ w (N, K)^T [+ b (N,), empty for none], for a few rows: each
    weight row is read once and dotted with all S inputs (torch's GEMM at 2-8 rows reads
    at 5-8 GB/s on one thread, this at 8-11; measured on Qwen2.5-0.5B's matrices)."""
    S, K = x.shape
    N = w.shape[0]
    out = np.empty((S, N), np.float32)
    has_b = b.size > 0
    for n in prange(N):
        for s in range(S):
            acc = np.float32(0)
            for k in range(K):
                acc += w[n, k] * x[s, k]
            out[s, n] = acc + b[n] if has_b else acc
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


@njit(**_OPTS)
def layer(x, ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd, eps, cos, sin, rot, wblk, woff,
          kd, ks, kz, vd, vs, vz, tables, lens, sm, kind, offset, qmax, symmetric, table,
          half, splits):
    """x (H,) fp32 residual stream of the one sequence, updated in place; the weights as
    nn.Linear stores them (out, in) fp32, biases (out,) or empty; cos, sin (1, D); the
    rest as decode_layer's. Writes the new k, v into the stores."""
    H = x.shape[0]
    D = cos.shape[1]
    h = np.empty(H, np.float32)
    _rms(x, ln1, eps, h)
    qkv = np.empty(wqkv.shape[0], np.float32)
    gemv(h, wqkv, bqkv, qkv)
    o = decode_layer(qkv.reshape(1, -1, D), cos, sin, rot, wblk, woff, kd, ks, kz, vd, vs,
                     vz, tables, lens, sm, kind, offset, qmax, symmetric, table, half, splits)
    a = np.empty(H, np.float32)
    gemv(o.reshape(-1), wo, bo, a)
    for j in range(H):
        x[j] += a[j]
    _rms(x, ln2, eps, h)
    gu = np.empty(wgu.shape[0], np.float32)
    gemv(h, wgu, bgu, gu)
    n = gu.shape[0] // 2
    act = np.empty(n, np.float32)
    for j in range(n):
        g = gu[j]
        act[j] = g / (np.float32(1) + np.float32(math.exp(-g))) * gu[n + j]
    gemv(act, wd, bd, a)
    for j in range(H):
        x[j] += a[j]
