"""Attention over each sequence's exact window: its newest tokens read exact instead of
from the quantized blocks.

A quantized cache loses the most on the tokens attention weighs most: the newest ones.
With an exact window of ``R`` tokens (``LLM(exact_window=R)``) every token is still
written to its quantized block, and also, in fp16, to a ring of ``R`` entries that belongs
to its sequence (cache index ``c`` at ring index ``c % R``). The rings, who holds which,
and each step's writes are the cache's (``edgekv/cache/exact_window.py``); this module is
the attention side every path reads: the arguments (``ExactWindowKV``), attention over
the window alone and the log-sum-exp merge with the blocks' part (the GPU decode and the
tiers); the CPU kernels read the rings inside their own loops, the oracle overlays them
(``reference.py``).

Rule: the query at position ``p`` reads key ``j`` exact when ``p - R < j <= p`` and
``j >= start`` (the first position the ring holds), from the blocks otherwise. Each
query has its own window, so what a token reads does not depend on how a prompt was cut
into chunks, and a recomputed sequence reads what it read the first time.

Where the exact values come from: decode writes the new token to the ring first, so the
ring holds the whole window; a prefill chunk reads the ring *before* this step's writes
(positions before the chunk) and the chunk's own new K/V (``new_k``, ``new_v``), and
writes the ring after.

    k, v:          (num_slots, R, Hkv, D)  fp16 rings, original basis (not rotated)
    slots:         (S,) int64   each sequence's ring (any value where it has none)
    start:         (S,) int64   first cache index held exactly (>= L_s: none)
    new_k, new_v:  (T, Hkv, D)  this step's K/V, prefill only (None for decode)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOG2E = 1.4426950408889634


class ExactWindowKV(NamedTuple):
    """One layer's exact window as attention reads it (the fields above)."""

    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    start: torch.Tensor
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def num_exact(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """(S,) int64: tokens a decode query (at position L - 1) reads exact."""
        lens = seq_lens.to(device=self.start.device, dtype=torch.long)
        lo = torch.maximum(self.start, lens - self.size)
        return (lens - lo).clamp(min=0)


def exact_decode_attention(q: torch.Tensor, exact: ExactWindowKV, seq_lens: torch.Tensor,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the exact tokens alone, to merge with the blocks' part.

    q: (S, Hq, D). Returns out (S, Hq, D) fp32 (0 where a sequence has none) and lse2
    (S, Hq) fp32, in log2 units as the decode kernel's (-inf where it has none).
    """
    S, Hq, D = q.shape
    R, Hkv = exact.size, exact.k.shape[2]
    G = Hq // Hkv
    dev = q.device
    lens = seq_lens.to(device=dev, dtype=torch.long)
    j = torch.arange(R, device=dev)
    valid = j[None, :] >= (R - exact.num_exact(seq_lens).to(dev))[:, None]  # (S, R)
    ring = (lens[:, None] - R + j[None, :]).clamp(min=0) % R  # (S, R)
    slots = exact.slots.to(dev).long()[:, None]
    k = exact.k[slots, ring].float()  # (S, R, Hkv, D)
    v = exact.v[slots, ring].float()
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
    return o1.float() * (w1 / den)[..., None] + o2.float() * (w2 / den)[..., None]
