"""The newest tokens of each sequence, read exact instead of from the quantized blocks.

A quantized cache loses the most on the tokens attention weighs most: the newest ones.
With a residual window of ``R`` tokens (``LLM(kv_residual=R)``, see ``edgekv/cache/residual.py``)
every token is still written to its quantized block, and also, in fp16, to a ring of
``R`` entries that belongs to its sequence (cache index ``c`` at ring index ``c % R``).

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

from edgekv.quant import KVFormat

LOG2E = 1.4426950408889634


class ExactTail(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    start: torch.Tensor
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def num_exact(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """(S,) int64: tokens a decode query (at position L - 1) reads exact."""
        lens = seq_lens.to(device=self.start.device, dtype=torch.long)
        lo = torch.maximum(self.start, lens - self.window)
        return (lens - lo).clamp(min=0)


def overlay_decode(x: torch.Tensor, ring: torch.Tensor, tail: ExactTail,
                   seq_lens: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Decode: replace the exact tokens of each row of ``x`` with the ring's (the ring
    already holds this step's token).

    x:    (S, Hkv, Lx, D) fp32 K or V gathered from the blocks, storage basis, row s
          holding cache indices [0, L_s) (Lx >= max L_s)
    ring: ``tail.k`` or ``tail.v``
    Mutates and returns ``x``.
    """
    R, dev = tail.window, x.device
    lens = seq_lens.to(device=dev, dtype=torch.long)  # (S,)
    r = tail.num_exact(seq_lens).to(dev)  # (S,)
    j = torch.arange(R, device=dev)
    s_idx, j_idx = (j[None, :] >= (R - r)[:, None]).nonzero(as_tuple=True)  # (N,), (N,)
    if s_idx.numel() == 0:
        return x
    c = lens[s_idx] - R + j_idx  # (N,) cache indices, >= 0 since num_exact <= L
    rows = ring[tail.slots.to(dev).long()[s_idx], c % R]  # (N, Hkv, D)
    x[s_idx, :, c] = fmt.to_storage_basis(rows.float())
    return x


def prefill_exact(k: torch.Tensor, v: torch.Tensor, tail: ExactTail, s: int, L: int,
                  new: slice, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill, sequence ``s``: its K/V with exact values wherever a query may read them,
    and which (query, key) pairs do.

    k, v: (Hkv, L, D) fp32 from the blocks, storage basis; ``new``: the rows of this
    sequence's n new tokens (positions [L - n, L)) in ``tail.new_k``.
    Returns exact K, exact V (Hkv, L, D) and ``use`` (n, L) bool.
    """
    R, dev = tail.window, k.device
    n = new.stop - new.start
    a = L - n
    start = int(tail.start[s])
    ke, ve = k.clone(), v.clone()
    lo = max(start, a - R + 1, 0)  # the oldest key any query of the chunk reads exact
    if lo < a:  # from the ring, as it was before this step's writes
        pos = torch.arange(lo, a, device=dev)
        slot = int(tail.slots[s])
        ke[:, lo:a] = fmt.to_storage_basis(tail.k[slot, pos % R].float()).transpose(0, 1)
        ve[:, lo:a] = fmt.to_storage_basis(tail.v[slot, pos % R].float()).transpose(0, 1)
    if start < L:  # the chunk's own tokens, rounded as the ring will hold them
        dt = tail.k.dtype
        ke[:, a:] = fmt.to_storage_basis(tail.new_k[new].to(dt).float()).transpose(0, 1)
        ve[:, a:] = fmt.to_storage_basis(tail.new_v[new].to(dt).float()).transpose(0, 1)
    qpos = torch.arange(a, L, device=dev)[:, None]  # (n, 1)
    kpos = torch.arange(L, device=dev)[None, :]  # (1, L)
    use = (kpos >= start) & (kpos > qpos - R) & (kpos <= qpos)  # (n, L)
    return ke, ve, use


def exact_decode_attention(q: torch.Tensor, tail: ExactTail, seq_lens: torch.Tensor,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the exact tokens alone, to merge with the blocks' part.

    q: (S, Hq, D). Returns out (S, Hq, D) fp32 (0 where a sequence has none) and lse2
    (S, Hq) fp32, in log2 units as the decode kernel's (-inf where it has none).
    """
    S, Hq, D = q.shape
    R, Hkv = tail.window, tail.k.shape[2]
    G = Hq // Hkv
    dev = q.device
    lens = seq_lens.to(device=dev, dtype=torch.long)
    j = torch.arange(R, device=dev)
    valid = j[None, :] >= (R - tail.num_exact(seq_lens).to(dev))[:, None]  # (S, R)
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
    return o1.float() * (w1 / den)[..., None] + o2.float() * (w2 / den)[..., None]
