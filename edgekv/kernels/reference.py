"""Pure-torch paged attention over quantized blocks: the CPU path and the kernels' reference.

Notation (as in every kernel docstring of this package):
    S       sequences in the batch             Hq   query heads     Hkv  KV heads
    T       query tokens, all sequences        D    head_dim        B    block_size
    L_s     KV length of sequence s, *including* its new tokens (already written)
    G = Hq / Hkv   query heads per KV head; query head h reads KV head h // G

Each sequence's queries are its last ``q_len`` positions: query i of sequence s sits at
position ``L_s - q_len_s + i`` and attends causally to KV positions ``<= `` that. Decode is
the case ``q_len = 1``. The new tokens' K/V must be written to the cache before attention.

Attention runs in the format's storage basis: the query is rotated once, scores and
weighted sums use the decoded (still rotated) codes, and the output is rotated back once.
This equals attention over the dequantized K/V because the rotation is orthogonal.
"""

from __future__ import annotations

import torch

from edgekv.quant import KVFormat, QuantizedKV

from .launch_checks import attention_dims, observed_queries, query_rows
from .window_attention import ExactWindowKV


def gather_blocks(cache: QuantizedKV, block_ids: torch.Tensor, length: int,
                  fmt: KVFormat) -> torch.Tensor:
    """Decode one sequence's first ``length`` tokens from its blocks.

    cache: one layer's K or V storage, data (num_blocks, Hkv, B, P)
    block_ids: (>= ceil(length / B),) int
    returns (Hkv, length, D) fp32 in the storage basis
    """
    num_blocks = -(-length // cache.data.shape[2])
    ids = block_ids[:num_blocks].long()
    part = QuantizedKV(
        cache.data[ids],  # (nb, Hkv, B, P)
        None if cache.scale is None else cache.scale[ids],
        None if cache.zero is None else cache.zero[ids],
    )
    x = fmt.decode(part)  # (nb, Hkv, B, D)
    x = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1])  # (Hkv, nb*B, D)
    return x[:, :length]


def paged_prefill_attention_ref(
    q: torch.Tensor,             # (T, Hq, D)
    k_cache: QuantizedKV,        # data (num_blocks, Hkv, B, P)
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks) int, padded with any value
    seq_lens: torch.Tensor,      # (S,) KV length per sequence, new tokens included
    cu_seqlens_q: torch.Tensor,  # (S + 1,) query offsets into T
    fmt: KVFormat,
    sm_scale: float | None = None,
    exact: ExactWindowKV | None = None,
) -> torch.Tensor:               # (T, Hq, D) in q's dtype
    """Causal attention of each sequence's query tokens over its paged, quantized history
    (its newest tokens read from ``exact`` when given: window_attention.py)."""
    T, Hq, D, Hkv, B, G, sm_scale = attention_dims(q, k_cache, sm_scale)
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    qs = fmt.to_storage_basis(q.float())  # (T, Hq, D)
    for s, L, q0, q1 in query_rows(seq_lens, cu_seqlens_q):
        n = q1 - q0
        k = gather_blocks(k_cache, block_tables[s], L, fmt)  # (Hkv, L, D)
        v = gather_blocks(v_cache, block_tables[s], L, fmt)  # (Hkv, L, D)
        qh = qs[q0:q1].reshape(n, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, n, D)
        scores = torch.einsum("hgnd,hld->hgnl", qh, k) * sm_scale  # (Hkv, G, n, L)
        if exact is not None:  # each query's newest keys exact (window_attention.py)
            ke, ve, use = prefill_exact(k, v, exact, s, L, slice(q0, q1), fmt)  # use: (n, L)
            scores = torch.where(use, torch.einsum("hgnd,hld->hgnl", qh, ke) * sm_scale,
                                 scores)
        qpos = torch.arange(L - n, L, device=q.device)  # (n,)
        kpos = torch.arange(L, device=q.device)  # (L,)
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        if exact is None:
            o = torch.einsum("hgnl,hld->hgnd", p, v)  # (Hkv, G, n, D)
        else:
            o = torch.einsum("hgnl,hld->hgnd", p.masked_fill(use, 0.0), v) + \
                torch.einsum("hgnl,hld->hgnd", p.masked_fill(~use, 0.0), ve)
        out[q0:q1] = o.permute(2, 0, 1, 3).reshape(n, Hq, D)
    return fmt.from_storage_basis(out).to(q.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,             # (S, Hq, D): one query token per sequence
    k_cache: QuantizedKV,
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,) KV length, the new token included
    fmt: KVFormat,
    sm_scale: float | None = None,
    return_block_mass: bool = False,
    exact: ExactWindowKV | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # (S, Hq, D) [, (S, max_blocks)]
    """Attention of one new token per sequence over its whole paged history.

    Batched over sequences (the CPU decode path): every sequence's blocks are gathered up
    to the longest one, and slots past a sequence's length are masked out of the scores
    and zeroed in V, whatever they hold. With ``exact``, each sequence's newest tokens are
    read from its exact ring instead of its blocks (window_attention.py). With
    ``return_block_mass`` also returns the block mass of ``decode_block_mass_ref``, taken
    from the same probabilities (no second pass over the history).
    """
    S, Hq, D, Hkv, B, G, sm_scale = attention_dims(q, k_cache, sm_scale)
    if S == 0:
        out = torch.empty_like(q)
        if return_block_mass:
            return out, torch.zeros(0, block_tables.shape[1], device=q.device)
        return out
    max_len = int(seq_lens.max())
    nb = -(-max_len // B)
    owned = torch.arange(nb, device=q.device)[None, :] < (seq_lens.to(q.device)[:, None]
                                                          + B - 1) // B
    ids = torch.where(owned, block_tables[:, :nb].long().to(q.device), 0)  # (S, nb)

    def gather(cache: QuantizedKV) -> torch.Tensor:  # -> (S, Hkv, nb * B, D) fp32
        part = QuantizedKV(cache.data[ids], None if cache.scale is None else cache.scale[ids],
                           None if cache.zero is None else cache.zero[ids])
        x = fmt.decode(part)  # (S, nb, Hkv, B, D)
        return x.permute(0, 2, 1, 3, 4).reshape(S, Hkv, nb * B, D)

    pad = torch.arange(nb * B, device=q.device)[None, :] >= seq_lens.to(q.device)[:, None]
    k, v = gather(k_cache), gather(v_cache)
    if exact is not None:  # the newest tokens from the exact ring (window_attention.py)
        k = overlay_decode(k, exact.k, exact, seq_lens, fmt)
        v = overlay_decode(v, exact.v, exact, seq_lens, fmt)
    v = v.masked_fill(pad[:, None, :, None], 0.0)  # unwritten slots may hold anything
    qs = fmt.to_storage_basis(q.float()).view(S, Hkv, G, D)
    scores = torch.einsum("shgd,shld->shgl", qs, k) * sm_scale  # (S, Hkv, G, nb * B)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("shgl,shld->shgd", p, v).reshape(S, Hq, D)
    out = fmt.from_storage_basis(out).to(q.dtype)
    if not return_block_mass:
        return out
    mass = torch.zeros(S, block_tables.shape[1], dtype=torch.float32, device=q.device)
    mass[:, :nb] = p.sum((1, 2)).view(S, nb, B).sum(-1)  # masked slots hold 0
    return out, mass


def decode_block_mass_ref(
    q: torch.Tensor,             # (S, Hq, D)
    k_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,)
    fmt: KVFormat,
    sm_scale: float | None = None,
) -> torch.Tensor:               # (S, max_blocks) fp32
    """Softmax mass each block of a decode step receives, summed over the Hq query heads.

    ``mass[s, b]`` covers the tokens in ``block_tables[s, b]``; each row sums to Hq and is 0
    past ``ceil(L_s / B)``. Same scores as paged_decode_attention_ref.
    """
    S, Hq, D, Hkv, B, G, sm_scale = attention_dims(q, k_cache, sm_scale)
    mass = torch.zeros(S, block_tables.shape[1], dtype=torch.float32, device=q.device)
    qs = fmt.to_storage_basis(q.float())  # (S, Hq, D)
    for s, L in enumerate(seq_lens.tolist()):
        if L == 0:
            continue
        k = gather_blocks(k_cache, block_tables[s], L, fmt)  # (Hkv, L, D)
        scores = torch.einsum("hgd,hld->hgl", qs[s].reshape(Hkv, G, D), k) * sm_scale
        p = torch.softmax(scores, dim=-1).sum((0, 1))  # (L,)
        nb = -(-L // B)
        mass[s, :nb] = torch.nn.functional.pad(p, (0, nb * B - L)).reshape(nb, B).sum(1)
    return mass


def prefill_block_mass_ref(
    q: torch.Tensor,             # (T, Hq, D)
    k_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,) KV length, new tokens included
    cu_seqlens_q: torch.Tensor,  # (S + 1,)
    fmt: KVFormat,
    sm_scale: float | None = None,
    last_n: int = 32,
) -> torch.Tensor:               # (S, max_blocks) fp32
    """Block mass from the last ``last_n`` queries of each sequence's new tokens (an
    observation window, as SnapKV scores a prompt), causal, summed over queries and Hq
    heads: row s sums to ``min(last_n, q_len_s) * Hq``. Same scores as
    paged_prefill_attention_ref. Only the window's scores are computed, so this costs
    ``last_n`` rows of attention per sequence, not the chunk's."""
    T, Hq, D, Hkv, B, G, sm_scale = attention_dims(q, k_cache, sm_scale)
    mass = torch.zeros(len(seq_lens), block_tables.shape[1], dtype=torch.float32,
                       device=q.device)
    for s, L, qs in observed_queries(q, seq_lens, cu_seqlens_q, last_n, fmt):
        n = qs.shape[0]  # qs: (n, Hq, D)
        k = gather_blocks(k_cache, block_tables[s], L, fmt)  # (Hkv, L, D)
        qh = qs.reshape(n, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, n, D)
        scores = torch.einsum("hgnd,hld->hgnl", qh, k) * sm_scale  # (Hkv, G, n, L)
        qpos = torch.arange(L - n, L, device=q.device)
        kpos = torch.arange(L, device=q.device)
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1).sum((0, 1, 2))  # (L,)
        nb = -(-L // B)
        mass[s, :nb] = torch.nn.functional.pad(p, (0, nb * B - L)).reshape(nb, B).sum(1)
    return mass


def write_kv_ref(k_store: QuantizedKV, v_store: QuantizedKV, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor, fmt: KVFormat) -> None:
    """Quantize new K/V (num_tokens, Hkv, D) with ``fmt.quantize`` and store them at flat
    ``slots`` (block_id * B + offset), as PagedKVCache.write does. Mutates the stores at
    those slots only."""
    B = k_store.data.shape[2]
    slots = slots.to(device=k_store.data.device, dtype=torch.long)
    blk, off = slots // B, slots % B  # (num_tokens,)
    for store, x in ((k_store, k), (v_store, v)):
        q = fmt.quantize(x.to(store.data.device))  # (num_tokens, Hkv, ...)
        store.data[blk, :, off] = q.data  # indexed view: (num_tokens, Hkv, packed_dim)
        if q.scale is not None:
            store.scale[blk, :, off] = q.scale
        if q.zero is not None:
            store.zero[blk, :, off] = q.zero


# ---- the exact window, read as the oracle reads it (window_attention.py) ----------
def overlay_decode(x: torch.Tensor, ring: torch.Tensor, exact: ExactWindowKV,
                   seq_lens: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Decode: replace the exact tokens of each row of ``x`` with the ring's (the ring
    already holds this step's token).

    x:    (S, Hkv, Lx, D) fp32 K or V gathered from the blocks, storage basis, row s
          holding cache indices [0, L_s) (Lx >= max L_s)
    ring: ``exact.k`` or ``exact.v``
    Mutates and returns ``x``.
    """
    R, dev = exact.size, x.device
    lens = seq_lens.to(device=dev, dtype=torch.long)  # (S,)
    r = exact.num_exact(seq_lens).to(dev)  # (S,)
    j = torch.arange(R, device=dev)
    s_idx, j_idx = (j[None, :] >= (R - r)[:, None]).nonzero(as_tuple=True)  # (N,), (N,)
    if s_idx.numel() == 0:
        return x
    c = lens[s_idx] - R + j_idx  # (N,) cache indices, >= 0 since num_exact <= L
    rows = ring[exact.slots.to(dev).long()[s_idx], c % R]  # (N, Hkv, D)
    x[s_idx, :, c] = fmt.to_storage_basis(rows.float())
    return x


def prefill_exact(k: torch.Tensor, v: torch.Tensor, exact: ExactWindowKV, s: int, L: int,
                  new: slice, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill, sequence ``s``: its K/V with exact values wherever a query may read them,
    and which (query, key) pairs do.

    k, v: (Hkv, L, D) fp32 from the blocks, storage basis; ``new``: the rows of this
    sequence's n new tokens (positions [L - n, L)) in ``exact.new_k``.
    Returns exact K, exact V (Hkv, L, D) and ``use`` (n, L) bool.
    """
    R, dev = exact.size, k.device
    n = new.stop - new.start
    a = L - n
    start = int(exact.start[s])
    ke, ve = k.clone(), v.clone()
    lo = max(start, a - R + 1, 0)  # the oldest key any query of the chunk reads exact
    if lo < a:  # from the ring, as it was before this step's writes
        pos = torch.arange(lo, a, device=dev)
        slot = int(exact.slots[s])
        ke[:, lo:a] = fmt.to_storage_basis(exact.k[slot, pos % R].float()).transpose(0, 1)
        ve[:, lo:a] = fmt.to_storage_basis(exact.v[slot, pos % R].float()).transpose(0, 1)
    if start < L:  # the chunk's own tokens, rounded as the ring will hold them
        dt = exact.k.dtype
        ke[:, a:] = fmt.to_storage_basis(exact.new_k[new].to(dt).float()).transpose(0, 1)
        ve[:, a:] = fmt.to_storage_basis(exact.new_v[new].to(dt).float()).transpose(0, 1)
    qpos = torch.arange(a, L, device=dev)[:, None]  # (n, 1)
    kpos = torch.arange(L, device=dev)[None, :]  # (1, L)
    use = (kpos >= start) & (kpos > qpos - R) & (kpos <= qpos)  # (n, L)
    return ke, ve, use
