"""Decode attention on the CPU, over the blocks as stored: the product path on CPU tensors.

Same contract as ``reference.paged_decode_attention_ref`` (the oracle it is tested
against, tests/test_kernels_cpu.py) and notation of reference.py. A call the compiled
kernel takes (cpu_compiled.py: no block mass, no exact window, a format it reads) runs
it; the rest runs here in torch, a handful of batched ops per layer over a plan made once
per step (cpu_plan.py):

    rows  -> index_select codes and scales            (S*Hkv*Lp, P) as stored, no permute
    scores = sm * s_k * (q · c) [+ sm * z_k * Σq] + bias        bmm, addcmul  (cpu_codes.py)
    p = softmax(scores)                                (ring scores joined when exact)
    out = (p * s_v) @ c_v [+ p @ z_v]                  bmm
    out @ o_mat                                        back to the original basis, once

so no scale is applied per element and sequences are padded only to the longest of their
length bucket; but the gathered codes are converted to fp32 before the dot, which is what
the compiled kernel avoids (README, "Kernels": 1.1-5.8x faster). ``torch.compile`` of this
core was slower than eager (266 us against 169 us at 16 sequences x 33 tokens, after 19 s
of compiling, and it needs a C++ compiler at run time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from edgekv.quant import KVFormat, QuantizedKV

from .cpu_codes import CodeReader, reader_for
from .cpu_compiled import compiled_decode
from .cpu_plan import DecodeBucket, exact_counts, plan_decode
from .launch_checks import attention_dims
from .window_attention import LOG2E, ExactWindowKV


def paged_decode_attention_cpu(
    q: torch.Tensor,             # (S, Hq, D)
    k_cache: QuantizedKV,        # data (num_blocks, Hkv, B, P), contiguous
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,) KV length, the new token included
    fmt: KVFormat,
    sm_scale: float | None = None,
    return_block_mass: bool = False,
    exact: ExactWindowKV | None = None,
    buckets: tuple[DecodeBucket, ...] | None = None,
    q_storage: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # (S, Hq, D) [, (S, max_blocks)]
    """Attention of one new token per sequence over its paged history; ``buckets`` from
    cpu_plan.plan_decode (made here when None, with ``exact``'s counts). ``q_storage``:
    q already in the storage basis, fp32 (the caller rotated it with k and v); the output
    is in the original basis either way. ``return_lse``: also (S, Hq) fp32 log2-sum-exp of
    the scores, to merge with attention over other keys (window_attention.merge_attention; not
    with ``exact`` or the block mass; every seq_len > 0). Does not mutate the caches."""
    S, Hq, D, Hkv, B, G, sm = attention_dims(q, k_cache, sm_scale)
    width = block_tables.shape[1]
    if S == 0:
        out = torch.empty_like(q)
        return (out, torch.zeros(0, width, device=q.device)) if return_block_mass else out
    reader = reader_for(fmt, D, q.device)
    qs = (reader.to_codes(q) if q_storage is None else q_storage).reshape(S * Hkv, G, D)
    assert not return_lse or (exact is None and not return_block_mass)
    if exact is None and not return_block_mass:
        lse = torch.empty(S, Hkv, G) if return_lse else None
        jit = compiled_decode(qs.view(S, Hkv, G, D), k_cache, v_cache, block_tables,
                              seq_lens, fmt, reader, sm, lse=lse)
        if jit is not None:
            out = reader.from_codes(jit.view(S, Hq, D)).to(q.dtype)
            return (out, lse.view(S, Hq) * LOG2E) if return_lse else out
    if buckets is None:  # the torch path's plan (the compiled kernel needs none)
        num_exact = None
        if exact is not None:
            num_exact = exact_counts(seq_lens, exact.start.to(q.device), exact.size)
        buckets = plan_decode(block_tables, seq_lens, B, Hkv, num_exact)
    ring = None if exact is None else _ExactKeys.of(q, exact, seq_lens, sm, B)
    mass = torch.zeros(S, width, dtype=torch.float32, device=q.device) \
        if return_block_mass else None
    p_ring = lse = None
    if return_lse:
        lse = torch.empty(S, Hkv, G, dtype=torch.float32, device=q.device)
    if len(buckets) == 1 and buckets[0].seqs is None:
        out, p, p_ring = _attend(qs, k_cache, v_cache, buckets[0], reader, sm,
                                 None if ring is None else ring.scores,
                                 None if lse is None else lse.view(S * Hkv, G))
        if mass is not None:
            nb = min(buckets[0].length // B, width)
            mass[:, :nb] = p.view(S, Hq, -1, B).sum((1, 3))[:, :nb]
    else:
        assert ring is None, "an exact window plans one bucket"
        out = torch.empty(S, Hkv, G, D, dtype=torch.float32, device=q.device)
        q4 = qs.view(S, Hkv, G, D)
        for b in buckets:
            part = None if lse is None else lse.new_empty(len(b.seqs) * Hkv, G)
            o, p, _ = _attend(q4[b.seqs].view(-1, G, D), k_cache, v_cache, b, reader, sm,
                              lse=part)
            out[b.seqs] = o.view(-1, Hkv, G, D)
            if part is not None:
                lse[b.seqs] = part.view(-1, Hkv, G)
            if mass is not None:
                nb = min(b.length // B, width)
                mass[b.seqs, :nb] = p.view(len(b.seqs), Hq, -1, B).sum((1, 3))[:, :nb]
        out = out.view(S * Hkv, G, D)
    out = reader.from_codes(out.view(S, Hq, D))
    if ring is not None:  # the exact keys' part, in the original basis
        R = ring.v.shape[1]
        out = out + torch.einsum("shgr,srhd->shgd", p_ring.view(S, Hkv, G, R),
                                 ring.v).reshape(S, Hq, D)
        if mass is not None:
            mass.scatter_add_(1, ring.block, p_ring.view(S, Hq, R).sum(1))
    out = out.to(q.dtype)
    if lse is not None:
        return out, lse.view(S, Hq) * LOG2E
    return (out, mass) if return_block_mass else out


def _attend(qs: torch.Tensor, k: QuantizedKV, v: QuantizedKV, b: DecodeBucket,
            reader: CodeReader, sm: float, ring_scores: torch.Tensor | None = None,
            lse: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """qs (Sb*Hkv, G, D) in the codes' basis -> out (Sb*Hkv, G, D) codes' basis (the exact
    keys' part not included), p (Sb*Hkv, G, Lp) the blocks' probabilities and p_ring
    (Sb*Hkv, G, R) the exact keys' (one softmax over both), None without ring_scores.
    ``lse``: (Sb*Hkv, G) filled with the scores' natural log-sum-exp (no ring)."""
    n, L = qs.shape[0], b.length
    kc = reader.read(k, b.rows).view(n, L, -1)  # (n, Lp, D)
    raw = torch.bmm(qs, kc.transpose(1, 2))  # (n, G, Lp)
    if reader.token_scale:
        scores = torch.addcmul(b.bias, raw, k.scale.view(-1).index_select(0, b.rows)
                               .view(n, 1, L), value=sm)
        if k.zero is not None:
            kz = k.zero.view(-1).index_select(0, b.rows).view(n, 1, L)
            scores = torch.addcmul(scores, qs.sum(-1, keepdim=True), kz, value=sm)
    else:
        scores = torch.add(b.bias, raw, alpha=sm)
    p_ring = None
    if lse is not None:
        torch.logsumexp(scores, dim=-1, out=lse)
    if ring_scores is None:
        p = torch.softmax(scores, dim=-1)
    else:
        p_all = torch.softmax(torch.cat([scores, ring_scores], dim=-1), dim=-1)
        p, p_ring = p_all[..., :L], p_all[..., L:]
    vc = reader.read(v, b.rows).view(n, L, -1)  # (n, Lp, D)
    if not reader.token_scale:
        return torch.bmm(p, vc), p, p_ring
    pv = p * v.scale.view(-1).index_select(0, b.rows).view(n, 1, L)  # V scale in the weights
    if v.zero is None:
        return torch.bmm(pv, vc), p, p_ring
    vz = v.zero.view(-1).index_select(0, b.rows).view(n, L, 1)
    return torch.baddbmm(torch.bmm(p, vz.to(p.dtype)), pv, vc), p, p_ring


class _ExactKeys(NamedTuple):
    """A decode step's exact keys (kernels/window_attention.py), original basis.

    scores: (S*Hkv, G, R) fp32, -inf where a ring entry is not read
    v:      (S, R, Hkv, D) fp32 ring values
    block:  (S, R) int64 block index of each entry's position (for block mass)
    """

    scores: torch.Tensor
    v: torch.Tensor
    block: torch.Tensor

    @staticmethod
    def of(q: torch.Tensor, exact: ExactWindowKV, seq_lens: torch.Tensor, sm: float,
           block_size: int) -> _ExactKeys:
        S, Hq, D = q.shape
        R, Hkv = exact.size, exact.k.shape[2]
        dev = q.device
        lens = seq_lens.to(device=dev, dtype=torch.long)
        n_exact = exact_counts(seq_lens, exact.start.to(dev), R)
        j = torch.arange(R, device=dev)
        valid = j[None, :] >= (R - n_exact)[:, None]  # (S, R)
        pos = (lens[:, None] - R + j[None, :]).clamp(min=0)  # (S, R) cache index
        slots = exact.slots.to(dev).long()[:, None]
        k = exact.k[slots, pos % R].float()  # (S, R, Hkv, D)
        v = exact.v[slots, pos % R].float()
        scores = torch.einsum("shgd,srhd->shgr", q.float().view(S, Hkv, Hq // Hkv, D), k)
        scores = (scores * sm).masked_fill(~valid[:, None, None, :], float("-inf"))
        return _ExactKeys(scores.reshape(S * Hkv, Hq // Hkv, R), v, pos // block_size)
