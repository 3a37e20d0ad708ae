"""The newest tokens of each sequence, read exact instead of from the quantized blocks.

A quantized cache loses the most on the tokens attention weighs most: the newest ones.
With a residual window (``LLM(kv_residual=R)``, see ``edgekv/residual.py``) every token
is still written to its quantized block, and also, in fp16, to a ring of ``R`` entries
per sequence; attention then reads each sequence's last ``num_exact`` cached tokens from
the ring and the rest from the blocks. Cache index ``c`` sits at ring index ``c % R``.

    k, v:       (num_slots, R, Hkv, D)  fp16, original basis (not rotated)
    slots:      (S,) int64              each sequence's ring (any value where num_exact is 0)
    num_exact:  (S,) int64              0 <= num_exact[s] <= min(R, L_s)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from edgekv.quant import KVFormat


class ExactTail(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    num_exact: torch.Tensor


def overlay_exact(x: torch.Tensor, ring: torch.Tensor, tail: ExactTail, seq_lens: torch.Tensor,
                  fmt: KVFormat) -> torch.Tensor:
    """Replace the last ``num_exact[s]`` tokens of each row of ``x`` with the ring's.

    x:    (S, Hkv, Lx, D) fp32 K or V gathered from the blocks, in the storage basis,
          row s holding its cache indices [0, L_s) (Lx >= max L_s)
    ring: ``tail.k`` or ``tail.v``
    Mutates and returns ``x``.
    """
    R = ring.shape[1]
    dev = x.device
    lens = seq_lens.to(device=dev, dtype=torch.long)  # (S,)
    r = tail.num_exact.to(device=dev, dtype=torch.long)  # (S,)
    j = torch.arange(R, device=dev)  # (R,)
    c = lens[:, None] - R + j[None, :]  # (S, R) cache index of the ring's j-th newest slot
    s_idx, j_idx = (j[None, :] >= (R - r)[:, None]).nonzero(as_tuple=True)  # (N,), (N,)
    if s_idx.numel() == 0:
        return x
    cc = c[s_idx, j_idx]  # (N,) cache indices, all >= 0 since num_exact <= L
    rows = ring[tail.slots.to(dev).long()[s_idx], cc % R]  # (N, Hkv, D)
    x[s_idx, :, cc] = fmt.to_storage_basis(rows.float())
    return x


def exact_decode_attention(q: torch.Tensor, tail: ExactTail, seq_lens: torch.Tensor,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the exact tails alone, to merge with the blocks' part.

    q: (S, Hq, D). Returns out (S, Hq, D) fp32 (0 where num_exact is 0) and lse2 (S, Hq)
    fp32, log2 units as the decode kernel's (-inf where num_exact is 0).
    """
    S, Hq, D = q.shape
    R, Hkv = tail.k.shape[1], tail.k.shape[2]
    G = Hq // Hkv
    dev = q.device
    lens = seq_lens.to(device=dev, dtype=torch.long)
    j = torch.arange(R, device=dev)
    valid = j[None, :] >= (R - tail.num_exact.to(dev).long())[:, None]  # (S, R)
    ring = (lens[:, None] - R + j[None, :]).clamp(min=0) % R  # (S, R)
    slots = tail.slots.to(dev).long()[:, None]
    k = tail.k[slots, ring].float()  # (S, R, Hkv, D)
    v = tail.v[slots, ring].float()
    scores = torch.einsum("shgd,srhd->shgr", q.float().view(S, Hkv, G, D), k) * sm_scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))  # (S, Hkv, G, R)
    lse = torch.logsumexp(scores, dim=-1)  # (S, Hkv, G), -inf where nothing is valid
    p = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
    out = torch.einsum("shgr,srhd->shgd", p, v).reshape(S, Hq, D)
    return out, lse.reshape(S, Hq) * LOG2E


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                    lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets, from each set's normalised
    output (S, Hq, D) and log2-sum-exp (S, Hq) (-inf: an empty set)."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp2(lse1 - m), torch.exp2(lse2 - m)  # (S, Hq)
    den = (w1 + w2).clamp(min=torch.finfo(torch.float32).tiny)
    return (o1.float() * (w1 / den)[..., None] + o2.float() * (w2 / den)[..., None])


LOG2E = 1.4426950408889634
