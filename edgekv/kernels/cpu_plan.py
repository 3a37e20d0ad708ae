"""The per-step plan of the CPU attention path: everything every layer would re-derive.

FlashInfer's plan/run split: ``plan_step`` runs once per engine step (the model runner calls
it) and every layer's write and attention only *run* over its tensors. Block ids are shared
by all layers and every layer's storage has the same shape, so the row a slot occupies in
one layer's storage is the row it occupies in all of them.

Rows. One layer's K (or V) codes, viewed flat, are rows of packed_dim elements::

    data.view(-1, P)   row ((block * Hkv) + head) * B + offset    (head-major in a block)

and its scales / zeros the same rows of ``scale.view(-1, groups)``. A decode bucket
lists, for each of its sequences, KV head and position ``l < length``, the row to read:
one ``index_select`` gathers a layer's whole batch history in (S, Hkv, length) order, with
no permute. Positions past a sequence's visible length read that sequence's first row (a
slot it owns, so the codes are finite) and get a ``-inf`` bias, so they weigh exactly 0.

Length buckets. Sequences are padded only to the longest of their bucket; a batch whose
lengths differ widely is cut into buckets (sorted by length, each within 2x) so no
sequence pays for the longest one's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DecodeBucket:
    """seqs:   (Sb,) int64 indices into the batch, or None: the whole batch in order
    rows:   (Sb * Hkv * length,) int64 storage rows, (s, head, position) order
    bias:   (Sb * Hkv, 1, length) fp32, 0 where a position is read from the blocks, -inf
            past a sequence's visible length
    length: padded length, a multiple of B (block mass sums whole blocks)"""

    seqs: torch.Tensor | None
    rows: torch.Tensor
    bias: torch.Tensor
    length: int


@dataclass(frozen=True)
class SharedPrefix:
    """Groups of a decode batch's sequences whose block tables start with the same blocks
    (a system prompt found in the prefix cache, the samples of one request), so that the
    compiled attention reads those blocks once for the whole group:
    sel (S,) int32 each sequence's group (-1: none); slot (S,) int32 its place in the group;
    members (NG, M) int32 each group's sequences (-1 past ``count``); count (NG,) int32;
    blocks (NG,) int32 the leading blocks all of a group's sequences share, every one full
    and before the block that the step writes."""

    sel: np.ndarray
    slot: np.ndarray
    members: np.ndarray
    count: np.ndarray
    blocks: np.ndarray

    @staticmethod
    def none(num_seqs: int) -> SharedPrefix:
        return SharedPrefix(np.full(num_seqs, -1, np.int32), np.zeros(num_seqs, np.int32),
                            np.empty((0, 1), np.int32), np.empty(0, np.int32),
                            np.empty(0, np.int32))


# a group reads its blocks once per KV head where each of its sequences would read them:
# worth it from two sequences and two blocks (measured, demo model shapes, 16 sequences
# sharing 32 of ~35 blocks: the compiled attention 1.10 -> 0.92 ms per layer, one thread)
MIN_SHARED_BLOCKS = 2


def prefix_groups(tables: np.ndarray, full: np.ndarray) -> list[tuple[list[int], int]]:
    """Groups of sequences whose block tables (S, W) start with the same blocks, each as
    (members, shared blocks), counting for sequence s only its first ``full[s]`` blocks.
    Candidates share their first MIN_SHARED_BLOCKS blocks; of those, the group and the
    shared length that save the most block reads ((members - 1) x blocks) are taken, so
    that one request sharing little does not cut everyone's shared length down."""
    buckets: dict[tuple, list[int]] = {}
    for s in np.flatnonzero(full >= MIN_SHARED_BLOCKS).tolist():
        buckets.setdefault(tuple(tables[s, :MIN_SHARED_BLOCKS].tolist()), []).append(s)
    groups = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        ref = max(members, key=lambda s: full[s])
        agree = []
        for s in members:
            m = int(min(full[s], full[ref]))
            eq = tables[s, :m] == tables[ref, :m]
            agree.append(m if eq.all() else int(eq.argmin()))
        order = sorted(range(len(members)), key=lambda i: -agree[i])
        k = max(range(2, len(order) + 1), key=lambda k: (k - 1) * agree[order[k - 1]])
        groups.append((sorted(members[i] for i in order[:k]), agree[order[k - 1]]))
    return groups


def shared_prefixes(tables: np.ndarray, lens: np.ndarray, block_size: int) -> SharedPrefix:
    """The shared prefixes of a decode step (``prefix_groups``): tables (S, W) int32, lens
    (S,) KV lengths with the new token; a block is shared only if it is full and before
    the one the step writes."""
    S = len(lens)
    groups = prefix_groups(tables, (lens.astype(np.int64) - 1) // block_size)
    if not groups:
        return SharedPrefix.none(S)
    sel, slot = np.full(S, -1, np.int32), np.zeros(S, np.int32)
    members = np.full((len(groups), max(len(m) for m, _ in groups)), -1, np.int32)
    for g, (m, _) in enumerate(groups):
        members[g, :len(m)] = m
        sel[m] = g
        slot[m] = np.arange(len(m))
    return SharedPrefix(sel, slot, members,
                        np.array([len(m) for m, _ in groups], np.int32),
                        np.array([c for _, c in groups], np.int32))


@dataclass(frozen=True)
class JitStep:
    """A decode step's facts in the compiled kernels' form (cpu_compiled.compiled_layer):
    tables (S, W) int32 block tables; lens (S,) int32 KV lengths, the new token included;
    blocks, offsets (S,) int64 where each new token is written; max_len = lens.max();
    shared: the sequences that share leading blocks (None: read as sharing nothing)."""

    tables: np.ndarray
    lens: np.ndarray
    blocks: np.ndarray
    offsets: np.ndarray
    max_len: int
    shared: SharedPrefix | None = None


@dataclass(frozen=True)
class StepPlan:
    """What one step's layers share. ``write_rows``: (Hkv * T,) int64 storage rows of the
    new tokens (head-major, as a (Hkv, T, D) K or V lies); ``buckets``: the decode buckets
    (empty for a prefill step); ``num_exact``: (S,) tokens each decode query reads from its
    exact ring (None: no exact window); ``jit``: the step for the compiled decode layer
    (None: the layers run the torch path, or ``attend`` over ``buckets``)."""

    block_size: int
    num_kv_heads: int
    write_rows: torch.Tensor
    buckets: tuple[DecodeBucket, ...] = ()
    num_exact: torch.Tensor | None = None
    jit: JitStep | None = None


_NO_ROWS = torch.zeros(0, dtype=torch.int64)


def slot_rows(slots: torch.Tensor, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """(T,) flat slots (block * B + offset) -> (Hkv * T,) storage rows, head-major: row
    ``h * T + t`` is where token t's head h goes."""
    s = slots.detach().cpu().numpy().astype(np.int64)
    blk, off = s // block_size, s % block_size  # (T,)
    heads = np.arange(num_kv_heads)[:, None]
    rows = (blk[None, :] * num_kv_heads + heads) * block_size + off[None, :]  # (Hkv, T)
    return torch.from_numpy(rows.reshape(-1)).to(slots.device)


def _bucket(table: np.ndarray, visible: np.ndarray, lens: np.ndarray,
            seqs: torch.Tensor | None, B: int, Hkv: int, dev: torch.device) -> DecodeBucket:
    """table (Sb, max_blocks); visible: (Sb,) tokens read from the blocks; lens: (Sb,)
    tokens owned (>= 1). Host arithmetic in numpy: a few us a step, not ~30 torch ops."""
    length = max(1, -(-int(lens.max()) // B)) * B
    pos = np.arange(length)  # (length,)
    owned = pos[None, :] < visible[:, None]  # (Sb, length)
    blk = np.where(owned, table[:, pos // B], table[:, :1])  # (Sb, length)
    off = np.where(owned, pos % B, 0)
    heads = np.arange(Hkv)[None, :, None]
    rows = (blk[:, None, :] * Hkv + heads) * B + off[:, None, :]  # (Sb, Hkv, length)
    bias = np.where(owned, np.float32(0), np.float32(-np.inf))[:, None, :]
    bias = np.ascontiguousarray(np.broadcast_to(bias, (len(lens), Hkv, length)))
    return DecodeBucket(seqs, torch.from_numpy(rows.reshape(-1)).to(dev),
                        torch.from_numpy(bias.reshape(-1, 1, length)).to(dev), length)


def plan_decode(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                num_kv_heads: int, num_exact: torch.Tensor | None = None
                ) -> tuple[DecodeBucket, ...]:
    """Buckets of a decode step. ``num_exact`` (S,): newest tokens of each sequence read
    from its exact ring instead (kernels/window_attention.py); an exact window keeps one
    bucket (its ring part is attended for the whole batch at once)."""
    dev = block_tables.device
    lens = seq_lens.detach().cpu().numpy().astype(np.int64)
    visible = lens if num_exact is None else lens - num_exact.detach().cpu().numpy()
    nb = max(1, -(-int(lens.max()) // block_size))
    table = block_tables[:, :nb].detach().cpu().numpy().astype(np.int64)  # (S, nb)
    groups = _length_groups(lens.tolist(), block_size) if num_exact is None else [None]
    if len(groups) == 1:
        return (_bucket(table, visible, lens, None, block_size, num_kv_heads, dev),)
    out = []
    for g in groups:
        idx = np.asarray(g)
        out.append(_bucket(table[idx], visible[idx], lens[idx],
                           torch.from_numpy(idx).to(dev), block_size, num_kv_heads, dev))
    return tuple(out)


def _length_groups(lens: list[int], B: int) -> list[list[int]]:
    """Sequence indices cut into groups of similar length (max within 2x of min + 2
    blocks); one group when padding to the longest wastes under a quarter."""
    padded = [-(-n // B) * B for n in lens]
    if max(padded) * len(lens) <= 1.25 * sum(padded) + 2 * B * len(lens):
        return [list(range(len(lens)))]
    order = sorted(range(len(lens)), key=lambda i: padded[i])
    groups, lo = [[order[0]]], padded[order[0]]
    for i in order[1:]:
        if padded[i] > 2 * lo + 2 * B:
            groups.append([])
            lo = padded[i]
        groups[-1].append(i)
    return groups


def exact_counts(seq_lens: torch.Tensor, start: torch.Tensor, window: int) -> torch.Tensor:
    """(S,) tokens a decode query reads exact: as ExactWindowKV.num_exact."""
    lens = seq_lens.to(device=start.device, dtype=torch.long)
    return (lens - torch.maximum(start, lens - window)).clamp(min=0)


def plan_step(block_tables: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
              max_query_len: int, block_size: int, num_kv_heads: int,
              num_exact: torch.Tensor | None = None, compiled: bool = False) -> StepPlan:
    """Plan one step (decode buckets when every sequence has one new token). With
    ``compiled`` (the caller checked the compiled kernels can run this step), a decode step
    is planned for them instead: no buckets, no rows."""
    if compiled and max_query_len == 1 and len(seq_lens) and num_exact is None:
        lens = seq_lens.to(torch.int32).numpy()
        slots = slot_mapping.numpy()
        tables = block_tables.to(torch.int32).numpy()
        shared = shared_prefixes(tables, lens, block_size) if len(lens) > 1 else None
        jit = JitStep(tables, lens, slots // block_size, slots % block_size, int(lens.max()),
                      shared)
        return StepPlan(block_size, num_kv_heads, _NO_ROWS, (), None, jit)
    buckets = ()
    if max_query_len == 1 and len(seq_lens):
        buckets = plan_decode(block_tables, seq_lens, block_size, num_kv_heads, num_exact)
    return StepPlan(block_size, num_kv_heads, slot_rows(slot_mapping, block_size,
                                                        num_kv_heads), buckets, num_exact)
