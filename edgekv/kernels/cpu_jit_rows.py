"""Row-wise compiled kernels of the CPU path (numba; imported only by cpu_jit.py).

A decode step on a small model is a few hundred tiny ops, and torch's ``rms_norm`` is slow
for its size on a CPU: one (1, 256) row costs ~14 us inside a step (its composite kernel;
``layer_norm`` of the same row ~4 us), this loop ~1 us. Serial: a parallel numba call pays
~2.5 us to enter its thread pool, more than a decode step's rows take; a prefill's rows
(T x hidden) are a few tens of microseconds. (SwiGLU's ``silu(g) * u`` stays with torch,
whose exp is vectorised; numba's calls libm per element and was 1.3x slower.)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(fastmath={"reassoc", "contract", "nsz"}, cache=True, nogil=True)
def rms_norm(x, w, eps):
    """x (T, H) fp32, w (H,) fp32 -> x / sqrt(mean(x^2) + eps) * w, (T, H) fp32."""
    T, H = x.shape
    out = np.empty((T, H), np.float32)
    for t in range(T):
        ss = np.float32(0)
        for j in range(H):
            ss += x[t, j] * x[t, j]
        r = np.float32(1) / np.float32(math.sqrt(ss / np.float32(H) + eps))
        for j in range(H):
            out[t, j] = x[t, j] * r * w[j]
    return out
