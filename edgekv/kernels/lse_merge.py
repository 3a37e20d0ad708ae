"""Merge split-KV partial attention results with a log-sum-exp reduction (flash-decoding).

Each of ``NSPLIT`` programs of the decode kernel attended one slice of a sequence's KV and
left, per query head, an unnormalised output ``acc_j = sum_i 2**(s_i - m_j) v_i``, its
running maximum ``m_j`` and its mass ``l_j = sum_i 2**(s_i - m_j)`` (scores in log2 units).
The exact result is

    M = max_j m_j,   w_j = 2**(m_j - M),   out = sum_j w_j acc_j / sum_j w_j l_j,
    lse2 = M + log2(sum_j w_j l_j)

Empty splits carry ``m_j = -inf, l_j = 0`` and weigh nothing. A head with no KV at all
(seq_len 0) gets ``out = 0`` and ``lse2 = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_merge_kernel(
    acc_ptr, m_ptr, l_ptr,   # (S, Hq, NSPLIT, D), (S, Hq, NSPLIT), (S, Hq, NSPLIT) fp32
    out_ptr, lse_ptr,        # (S, Hq, D) any float dtype, (S, Hq) fp32
    num_splits, HQ, D, stride_os, stride_oh,
    HEADS: tl.constexpr, SPLITS_P: tl.constexpr, D_P: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # (HEADS,) query heads
    hm = h < HQ
    j = tl.arange(0, SPLITS_P)
    jm = hm[:, None] & (j < num_splits)[None, :]
    row = (s * HQ + h)[:, None] * num_splits + j[None, :]  # (HEADS, SPLITS_P)
    m = tl.load(m_ptr + row, mask=jm, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=jm, other=0.0)
    big = tl.max(m, axis=1)  # (HEADS,)
    big = tl.where(big == float("-inf"), 0.0, big)
    w = tl.exp2(m - big[:, None])  # 0 for empty splits
    denom = tl.sum(w * l, axis=1)  # (HEADS,)
    d = tl.arange(0, D_P)
    acc = tl.load(acc_ptr + row[:, :, None] * D + d[None, None, :],
                  mask=jm[:, :, None] & (d < D)[None, None, :], other=0.0)  # (HEADS, SPLITS_P, D_P)
    o = tl.sum(acc * w[:, :, None], axis=1)  # (HEADS, D_P)
    o = o / tl.where(denom > 0, denom, float("inf"))[:, None]  # no KV at all: 0
    o_off = s * stride_os + h[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=hm[:, None] & (d < D)[None, :])
    lse = tl.where(denom > 0, big + tl.log2(tl.where(denom > 0, denom, 1.0)), float("-inf"))
    tl.store(lse_ptr + s * HQ + h, lse, mask=hm)


def lse_merge(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, out: torch.Tensor,
              lse2: torch.Tensor, heads_per_program: int | None = None) -> None:
    """Write ``out`` (S, Hq, D) and ``lse2`` (S, Hq) from split partials; mutates only those.

    acc: (S, Hq, NSPLIT, D) fp32 contiguous; m, l: (S, Hq, NSPLIT) fp32 contiguous;
    out: last dim contiguous, any float dtype; lse2: (S, Hq) fp32 contiguous, log2 units.
    ``heads_per_program``: None picks 1 on a GPU (more programs) and all heads on the CPU
    interpreter (fewer, slower programs).
    """
    S, Hq, nsplit, D = acc.shape
    assert acc.is_contiguous() and m.is_contiguous() and l.is_contiguous()
    assert m.shape == l.shape == (S, Hq, nsplit) and acc.dtype == torch.float32
    assert out.shape == (S, Hq, D) and out.stride(-1) == 1
    assert lse2.shape == (S, Hq) and lse2.is_contiguous() and lse2.dtype == torch.float32
    if heads_per_program is None:
        heads_per_program = 1 if acc.is_cuda else triton.next_power_of_2(Hq)
    if S == 0:
        return
    _lse_merge_kernel[(S, triton.cdiv(Hq, heads_per_program))](
        acc, m, l, out, lse2, nsplit, Hq, D, out.stride(0), out.stride(1),
        HEADS=heads_per_program, SPLITS_P=triton.next_power_of_2(nsplit),
        D_P=triton.next_power_of_2(D),
    )
