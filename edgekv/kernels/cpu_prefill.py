"""Prefill / append attention on the CPU in key tiles: memory bounded by chunk x tile.

Without an exact window each sequence's keys go through torch's fused CPU flash
attention a segment at a time (``_flash_segments``), merged by log-sum-exp: the same
bounded memory, measured 3-4x faster than the torch tiles below, which keep the residual
window's exact keys and the block mass.

Same contracts as ``reference.paged_prefill_attention_ref`` and ``prefill_block_mass_ref``
(the oracles, tests/test_kernels_cpu.py), notation of reference.py. Each sequence's keys
are read ``tile`` tokens at a time from its blocks (only the rows it owns) and folded into
an online softmax (running max m, sum l, accumulator acc), so no (n x L) score matrix and
no (Hkv, L, D) history is ever held: peak memory grows with the chunk and the tile, never
with the history. An exact window's keys (window_attention.py) replace the blocks' in
the tiles they fall in, per (query, key) pair as the oracle's ``use`` mask says.

Block mass (eviction) takes two tiled passes over the observation window's queries: their
log-sum-exp first, then each tile's probabilities summed into its blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekv.quant import KVFormat, QuantizedKV

from .cpu_plan import prefix_groups
from .launch_checks import attention_dims, observed_queries, query_rows
from .window_attention import ExactWindowKV

# Scores held per tile: Hq x n x tile fp32. 4 Mi elements (16 MiB; a tile step holds a few
# such temporaries) whatever the history.
TILE_SCORES = 1 << 22


def _tile_len(Hq: int, n: int, B: int) -> int:
    return max(B, TILE_SCORES // max(1, Hq * n) // B * B)


def _read(store: QuantizedKV, table: torch.Tensor, t0: int, t1: int, fmt: KVFormat
          ) -> torch.Tensor:
    """Positions [t0, t1) of one sequence -> (Hkv, t1 - t0, D) fp32, storage basis."""
    Hkv, B = store.data.shape[1], store.data.shape[2]
    pos = torch.arange(t0, t1, device=store.data.device)
    blk = table[pos // B].long()
    rows = (blk[None, :] * Hkv + torch.arange(Hkv, device=pos.device)[:, None]) * B \
        + (pos % B)[None, :]  # (Hkv, t)
    rows = rows.reshape(-1)

    def gather(t):
        return None if t is None else t.view(-1, t.shape[-1]).index_select(0, rows)

    x = fmt.decode(QuantizedKV(gather(store.data), gather(store.scale), gather(store.zero)))
    return x.view(Hkv, t1 - t0, -1)


class _Exact:
    """One sequence's exact K/V (Hkv, L - e0, D) for positions [e0, L), storage basis,
    and the rule of which (query, key) pairs read them (as window_attention.prefill_exact)."""

    def __init__(self, exact: ExactWindowKV, s: int, L: int, new: slice, fmt: KVFormat):
        R, n = exact.size, new.stop - new.start
        a = L - n
        self.start, self.R, self.a = int(exact.start[s]), R, a
        self.e0 = min(max(self.start, a - R + 1, 0), L)
        parts_k, parts_v = [], []
        if self.e0 < a:  # from the ring, as it was before this step's writes
            pos = torch.arange(self.e0, a, device=exact.k.device)
            slot = int(exact.slots[s])
            parts_k.append(exact.k[slot, pos % R])
            parts_v.append(exact.v[slot, pos % R])
        if max(self.e0, a) < L:  # the chunk's own tokens, rounded as the ring holds them
            lo = new.start + max(self.e0, a) - a
            parts_k.append(exact.new_k[lo:new.stop].to(exact.k.dtype))
            parts_v.append(exact.new_v[lo:new.stop].to(exact.k.dtype))
        cat = (lambda xs: fmt.to_storage_basis(torch.cat(xs).float()).transpose(0, 1)) \
            if parts_k else (lambda xs: None)
        self.k, self.v = cat(parts_k), cat(parts_v)  # (Hkv, L - e0, D)

    def use(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """(n, t) bool: the pairs that read the exact value."""
        return (kpos[None, :] >= self.start) & (kpos[None, :] > qpos[:, None] - self.R) & \
            (kpos[None, :] <= qpos[:, None])


def _tile_scores(qh, k_cache, table, t0, t1, fmt, sm, qpos, ex: _Exact | None):
    """Scores (Hkv, G*n, t) of one tile (causal -inf applied), the blocks' V tile, and the
    exact part (use (n, t') and exact V (Hkv, t', D) of its last t' columns) or None."""
    Hkv, Gn, _ = qh.shape
    n = qpos.shape[0]
    kt = _read(k_cache, table, t0, t1, fmt)  # (Hkv, t, D)
    s = torch.bmm(qh, kt.transpose(1, 2)) * sm  # (Hkv, G*n, t)
    kpos = torch.arange(t0, t1, device=qh.device)
    exact = None
    if ex is not None and ex.k is not None and t1 > ex.e0:
        c0 = max(t0, ex.e0)
        use = ex.use(qpos, kpos[c0 - t0:])  # (n, t')
        se = torch.bmm(qh, ex.k[:, c0 - ex.e0:t1 - ex.e0].transpose(1, 2)) * sm
        u = use.repeat(Gn // n, 1)[None]  # (1, G*n, t')
        s[..., c0 - t0:] = torch.where(u, se, s[..., c0 - t0:])
        exact = (c0 - t0, u, ex.v[:, c0 - ex.e0:t1 - ex.e0])
    if t1 - 1 > int(qpos[0]):  # a key past some query: causal mask
        s.masked_fill_((kpos[None, :] > qpos[:, None]).repeat(Gn // n, 1)[None],
                       float("-inf"))
    return s, exact


# torch's fused CPU flash attention, which returns its log-sum-exp (GQA by head groups)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
SEGMENT_BYTES = 32 << 20  # fp32 K + V of one key segment


def _flash_segments(q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                    table: torch.Tensor, L: int, fmt: KVFormat, sm: float, start: int = 0,
                    prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (n, Hq, D) fp32 in the storage basis, the last n of L positions -> (n, Hq, D).

    The keys are read from the blocks a segment at a time (at most SEGMENT_BYTES of fp32
    K and V) and each segment goes through torch's fused flash attention, which tiles its
    scores internally: the history before the chunk, which every query sees whole, then
    the chunk's own keys with a causal mask. Segments merge by their log-sum-exp, so
    memory grows with the chunk and the segment, never with the history. ``prior``: the
    (out (1, Hq, n, D), lse (1, Hq, n)) of positions [0, start), attended already (a
    shared prefix, ``_shared_parts``); the history is then read from ``start``."""
    n, Hq, D = q.shape
    Hkv, B = k_cache.data.shape[1], k_cache.data.shape[2]
    a = L - n
    seg = max(B, SEGMENT_BYTES // (Hkv * D * 8) // B * B)
    qf = q.transpose(0, 1)[None]  # (1, Hq, n, D)
    out, lse = prior if prior is not None else (None, None)
    for t0, t1, causal in [(t, min(a, t + seg), False) for t in range(start, a, seg)] + \
            [(a, L, True)]:
        k = _read(k_cache, table, t0, t1, fmt)[None]  # (1, Hkv, t, D)
        v = _read(v_cache, table, t0, t1, fmt)[None]
        o, ls = _FLASH(qf, k, v, 0.0, causal, scale=sm)  # (1, Hq, n, D), (1, Hq, n)
        if out is None:
            out, lse = o, ls
            continue
        m = torch.maximum(lse, ls)
        wa, wb = torch.exp(lse - m), torch.exp(ls - m)
        out = (out * wa[..., None] + o * wb[..., None]) / (wa + wb)[..., None]
        lse = m + torch.log(wa + wb)
    return out[0].transpose(0, 1)  # (n, Hq, D)


def _shared_parts(qs: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                  block_tables: torch.Tensor, lens: list[int], cu: list[int], fmt: KVFormat,
                  sm: float) -> dict[int, tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Sequences whose histories start with the same blocks (a system prompt that several
    requests of one step found in the prefix cache): each group's shared blocks are read
    once and attended by all of its sequences' new tokens in one flash call. Returns, per
    such sequence, (tokens covered, (out (1, Hq, n, D), lse (1, Hq, n)) of its tokens),
    ``_flash_segments``' ``start`` and ``prior``. (Measured, demo model, 16 requests
    sharing 513 tokens: reading and converting a copy per sequence took a third of the
    step.)"""
    B = k_cache.data.shape[2]
    hist = np.array([(L - (cu[s + 1] - cu[s])) // B for s, L in enumerate(lens)])
    parts = {}
    for members, c in prefix_groups(block_tables.cpu().numpy(), hist):
        k = _read(k_cache, block_tables[members[0]], 0, c * B, fmt)[None]
        v = _read(v_cache, block_tables[members[0]], 0, c * B, fmt)[None]
        rows = torch.cat([qs[cu[s]:cu[s + 1]] for s in members])  # (N, Hq, D)
        o, ls = _FLASH(rows.transpose(0, 1)[None], k, v, 0.0, False, scale=sm)
        i = 0
        for s in members:
            n = cu[s + 1] - cu[s]
            parts[s] = (c * B, (o[:, :, i:i + n], ls[:, :, i:i + n]))
            i += n
    return parts


def paged_prefill_attention_cpu(
    q: torch.Tensor,             # (T, Hq, D)
    k_cache: QuantizedKV,
    v_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,)
    cu_seqlens_q: torch.Tensor,  # (S + 1,)
    fmt: KVFormat,
    sm_scale: float | None = None,
    exact: ExactWindowKV | None = None,
) -> torch.Tensor:               # (T, Hq, D) in q's dtype
    """Causal attention of each sequence's new tokens over its paged history, in key
    tiles with an online softmax. Does not mutate the caches."""
    T, Hq, D, Hkv, B, G, sm = attention_dims(q, k_cache, sm_scale)
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    qs = fmt.to_storage_basis(q.float())  # (T, Hq, D)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    shared = _shared_parts(qs, k_cache, v_cache, block_tables, lens, cu, fmt, sm) \
        if exact is None and _FLASH is not None and len(lens) > 1 else {}
    for s, L, q0, q1 in query_rows(seq_lens, cu_seqlens_q):
        n = q1 - q0
        if exact is None and _FLASH is not None:
            start, prior = shared.get(s, (0, None))
            out[q0:q1] = _flash_segments(qs[q0:q1], k_cache, v_cache, block_tables[s], L,
                                         fmt, sm, start, prior)
            continue
        qh = qs[q0:q1].view(n, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * n, D)
        qpos = torch.arange(L - n, L, device=q.device)
        ex = None if exact is None else _Exact(exact, s, L, slice(q0, q1), fmt)
        m = torch.full((Hkv, G * n, 1), float("-inf"), device=q.device)
        l = torch.zeros(Hkv, G * n, 1, device=q.device)
        acc = torch.zeros(Hkv, G * n, D, device=q.device)
        tile = _tile_len(Hq, n, B)
        for t0 in range(0, L, tile):
            t1 = min(L, t0 + tile)
            sc, ex_part = _tile_scores(qh, k_cache, block_tables[s], t0, t1, fmt, sm, qpos, ex)
            m_new = torch.maximum(m, sc.amax(-1, keepdim=True))  # finite: key 0 is read
            alpha = torch.exp(m - m_new)
            p = torch.exp(sc - m_new)  # (Hkv, G*n, t)
            l = l * alpha + p.sum(-1, keepdim=True)
            vt = _read(v_cache, block_tables[s], t0, t1, fmt)  # (Hkv, t, D)
            if ex_part is None:
                acc = torch.baddbmm(acc * alpha, p, vt)
            else:
                c0, u, ve = ex_part
                pe = p[..., c0:]
                acc = torch.baddbmm(acc * alpha, torch.cat([p[..., :c0],
                                                            pe.masked_fill(u, 0.0)], -1), vt)
                acc = torch.baddbmm(acc, pe.masked_fill(~u, 0.0), ve)
            m = m_new
        o = (acc / l).view(Hkv, G, n, D).permute(2, 0, 1, 3).reshape(n, Hq, D)
        out[q0:q1] = o
    return fmt.from_storage_basis(out).to(q.dtype)


def prefill_block_mass_cpu(
    q: torch.Tensor,             # (T, Hq, D)
    k_cache: QuantizedKV,
    block_tables: torch.Tensor,  # (S, max_blocks)
    seq_lens: torch.Tensor,      # (S,)
    cu_seqlens_q: torch.Tensor,  # (S + 1,)
    fmt: KVFormat,
    sm_scale: float | None = None,
    last_n: int = 32,
) -> torch.Tensor:               # (S, max_blocks) fp32
    """Block mass of each sequence's last ``last_n`` new queries (prefill_block_mass_ref's
    contract), in two tiled passes: the window's log-sum-exp, then its mass per block."""
    T, Hq, D, Hkv, B, G, sm = attention_dims(q, k_cache, sm_scale)
    mass = torch.zeros(len(seq_lens), block_tables.shape[1], dtype=torch.float32,
                       device=q.device)
    for s, L, qs in observed_queries(q, seq_lens, cu_seqlens_q, last_n, fmt):
        n = qs.shape[0]  # qs: (n, Hq, D)
        qh = qs.view(n, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * n, D)
        qpos = torch.arange(L - n, L, device=q.device)
        tile = _tile_len(Hq, n, B)
        tiles = [(t0, min(L, t0 + tile)) for t0 in range(0, L, tile)]
        m = torch.full((Hkv, G * n, 1), float("-inf"), device=q.device)
        l = torch.zeros(Hkv, G * n, 1, device=q.device)
        for t0, t1 in tiles:
            sc, _ = _tile_scores(qh, k_cache, block_tables[s], t0, t1, fmt, sm, qpos, None)
            m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
            l = l * torch.exp(m - m_new) + torch.exp(sc - m_new).sum(-1, keepdim=True)
            m = m_new
        lse = m + torch.log(l)
        per_pos = torch.zeros(-(-L // B) * B, device=q.device)
        for t0, t1 in tiles:
            sc, _ = _tile_scores(qh, k_cache, block_tables[s], t0, t1, fmt, sm, qpos, None)
            per_pos[t0:t1] = torch.exp(sc - lse).sum((0, 1))
        nb = -(-L // B)
        mass[s, :nb] = per_pos.view(nb, B).sum(1)
    return mass
