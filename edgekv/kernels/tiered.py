"""Attention over age tiers: each sequence's blocks live in more than one storage.

With ``kv_tiers`` (edgekv/tiers) a layer stores each age tier in its own storage and
format, and a block id names its tier by its range (``TierStore.offset``). A sequence's
table mixes them (older blocks in cheaper tiers)::

    table:  [ 40  41 | 3  7  9 ]     ids >= 32: the int4 tier (local ids 8, 9);
               int4     int8         ids < 32: the int8 tier (where new tokens go)

Decode: one paged-decode call per tier over that tier's blocks alone (``plan_tiers``
splits the tables once per step; order inside a tier does not matter to one query, and
only a sequence's last block is partial), the exact window (kernels/window_attention.py) as one
more part, merged by log-sum-exp: the history is never rebuilt.
Prefill: every block the step's tables hold is read once into one scratch storage (fp16
on a GPU, fp32 on a CPU; ids renumbered), then the single-format prefill attends over it
with its causal mask.
Oracle (``tiered_*_ref``): every block read into exact fp32 storage, then the reference
paged attention; the product paths are tested against it (tests/test_tiers.py).
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch

from edgekv.quant import KVFormat, QuantizedKV, get_format

from .dispatch import get_backend, paged_decode_attention, paged_prefill_attention
from .reference import paged_decode_attention_ref, paged_prefill_attention_ref
from .window_attention import ExactWindowKV, exact_decode_attention, merge_attention


class TierStore(NamedTuple):
    """One tier of one layer: its K and V storage, format, and first global block id."""

    k: QuantizedKV
    v: QuantizedKV
    fmt: KVFormat
    offset: int


class TierTables(NamedTuple):
    """A step's tables split by tier (``plan_tiers``).

    tables: per tier, (S, w_t) int32 local ids of the sequence's blocks in that tier, in
            table order (padded with 0)
    lens:   per tier, (S,) int32 tokens of the sequence in that tier
    """

    tables: tuple[torch.Tensor, ...]
    lens: tuple[torch.Tensor, ...]


def tier_index(offsets: tuple[int, ...], block: int) -> int:
    """The tier of global block id ``block`` (``offsets``: each tier's first id)."""
    return bisect.bisect_right(offsets, block) - 1


def plan_tiers(tables: list[list[int]], seq_lens: list[int], offsets: tuple[int, ...],
               block_size: int, device: torch.device | str) -> TierTables:
    """Split each sequence's table (global ids, covering ``seq_lens[s]`` tokens) by tier."""
    n = len(offsets)
    ids = [[[] for _ in tables] for _ in range(n)]
    lens = [[0] * len(tables) for _ in range(n)]
    for s, (table, L) in enumerate(zip(tables, seq_lens, strict=True)):
        for i, b in enumerate(table):
            t = tier_index(offsets, b)
            ids[t][s].append(b - offsets[t])
            lens[t][s] += max(0, min(block_size, L - i * block_size))
    out = []
    for rows in ids:
        w = max(1, max(len(r) for r in rows))
        out.append(torch.tensor([r + [0] * (w - len(r)) for r in rows], dtype=torch.int32,
                                device=device))
    return TierTables(tuple(out), tuple(torch.tensor(x, dtype=torch.int32, device=device)
                                        for x in lens))


READ_CHUNK = 256  # blocks dequantized at a time: bounds the fp32 transient of a long read


def read_blocks(stores: list[TierStore], ids: list[int] | torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of whole blocks (global ids), (n, Hkv, B, D) in ``dtype`` in the original
    basis, each read from its tier's codes (dequantized READ_CHUNK blocks at a time, so a
    16-bit result costs 16-bit memory plus a small fp32 transient)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=stores[0].k.data.device)
    k = v = None
    for t, st in enumerate(stores):
        end = stores[t + 1].offset if t + 1 < len(stores) else None
        sel = ids >= st.offset if end is None else (ids >= st.offset) & (ids < end)
        rows = sel.nonzero().flatten()
        for c in range(0, rows.numel(), READ_CHUNK):
            part = rows[c:c + READ_CHUNK]
            local = ids[part] - st.offset
            for j, store in enumerate((st.k, st.v)):
                x = st.fmt.dequantize(QuantizedKV(*(None if a is None else a[local]
                                                    for a in (store.data, store.scale,
                                                              store.zero))))
                if k is None:
                    k = torch.zeros(len(ids), *x.shape[1:], dtype=dtype, device=ids.device)
                    v = torch.zeros_like(k)
                (k if j == 0 else v)[part] = x.to(dtype)
    if k is None:
        raise ValueError("no blocks to read")
    return k, v


def _dense(stores: list[TierStore], block_tables: torch.Tensor, fmt: KVFormat
           ) -> tuple[QuantizedKV, QuantizedKV, torch.Tensor]:
    """Every distinct block of ``block_tables`` in one storage of ``fmt`` (fp16 or fp32:
    no scales), and the tables renumbered into it. Peak memory: the result (2 x U blocks
    of ``fmt``) and READ_CHUNK blocks of fp32."""
    ids, remap = torch.unique(block_tables.long(), return_inverse=True)
    k, v = read_blocks(stores, ids, fmt.storage_dtype)  # (U, Hkv, B, D)
    return QuantizedKV(k, None, None), QuantizedKV(v, None, None), remap.to(torch.int32)


def tiered_decode_attention(q: torch.Tensor, stores: list[TierStore],
                            block_tables: torch.Tensor, tiers: TierTables,
                            seq_lens: torch.Tensor, sm_scale: float,
                            exact: ExactWindowKV | None = None) -> torch.Tensor:
    """Decode, (S, Hq, D) -> (S, Hq, D): each tier's blocks (``tiers``, split from the
    global ``block_tables``) in their own call, the exact window apart, merged by
    log-sum-exp. The exact tokens are the newest of tier 0 (the demoter keeps them there),
    so tier 0 is read without them."""
    if get_backend() == "reference":
        return tiered_decode_attention_ref(q, stores, block_tables, seq_lens, sm_scale, exact)
    S, Hq, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((S, Hq), float("-inf"), device=q.device)
    for t, st in enumerate(stores):
        lens = tiers.lens[t].to(q.device).long()
        if t == 0 and exact is not None:
            lens = lens - exact.num_exact(seq_lens).to(q.device)
        rows = (lens > 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        o, l2 = paged_decode_attention(q[rows], st.k, st.v, tiers.tables[t][rows],
                                       lens[rows].to(torch.int32), st.fmt, sm_scale,
                                       return_lse=True)
        out[rows] = merge_attention(out[rows], lse[rows], o, l2)
        lse[rows] = _merged_lse(lse[rows], l2)
    if exact is not None:
        o, l2 = exact_decode_attention(q, exact, seq_lens, sm_scale)
        out = merge_attention(out, lse, o, l2)
    return out.to(q.dtype)


def _merged_lse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(a, b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m + torch.log2(torch.exp2(a - m) + torch.exp2(b - m))


def tiered_prefill_attention(q: torch.Tensor, stores: list[TierStore],
                             block_tables: torch.Tensor, seq_lens: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, sm_scale: float,
                             exact: ExactWindowKV | None = None, **kernel_options) -> torch.Tensor:
    """Causal prefill over tiered blocks, (T, Hq, D) -> (T, Hq, D): the step's blocks read
    into one storage (fp16 on a GPU, where the prefill kernel reads it; fp32 on a CPU),
    then the single-format prefill (any backend)."""
    if get_backend() == "reference":
        return tiered_prefill_attention_ref(q, stores, block_tables, seq_lens, cu_seqlens_q,
                                            sm_scale, exact)
    scratch = get_format("fp16" if q.device.type == "cuda" else "fp32")
    k, v, tables = _dense(stores, block_tables, scratch)
    return paged_prefill_attention(q, k, v, tables, seq_lens, cu_seqlens_q, scratch, sm_scale,
                                   exact=exact, **kernel_options)


# ---- the oracle ----------------------------------------------------------------------
def tiered_decode_attention_ref(q, stores, block_tables, seq_lens, sm_scale, exact=None):
    """The oracle: every block of every tier read exact (fp32), one reference call."""
    fp32 = get_format("fp32")
    k, v, remap = _dense(stores, block_tables, fp32)
    return paged_decode_attention_ref(q, k, v, remap, seq_lens, fp32, sm_scale, exact=exact)


def tiered_prefill_attention_ref(q, stores, block_tables, seq_lens, cu_seqlens_q, sm_scale,
                                 exact=None):
    fp32 = get_format("fp32")
    k, v, remap = _dense(stores, block_tables, fp32)
    return paged_prefill_attention_ref(q, k, v, remap, seq_lens, cu_seqlens_q, fp32,
                                       sm_scale, exact=exact)
