"""Which tensors of a session file hold a conversation's KV blocks, named after the
cache's own walk over its storage (``PagedKVCache.stored_tensors``), shared by saving
(io.py) and checking (check.py).

    one storage:  L{i}.{k|v}.{data|scale|zero}      (num_blocks, Hkv, B, ...) table order
    age tiers:    T{t}.L{i}.{k|v}.{data|scale|zero}  (blocks in tier t, Hkv, B, ...) the
                  table's entries in tier t, in table order; ``block_tiers`` (num_blocks,)
                  int64 says which tier each entry is in

``kv_identity`` names what a file's blocks must be loaded into: the format, or with age
tiers the tiers' formats (not their sizes: blocks keep their tier and age from there).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class BlockTensor(NamedTuple):
    key: str  # the tensor's name in the file
    tier: int
    layer: int
    kv: int  # 0: K, 1: V
    part: str  # "data", "scale" or "zero"
    store: torch.Tensor  # the cache's tensor (num blocks of the tier, Hkv, B, ...)
    rows: tuple[int, ...]  # the table entries it holds, in table order


def kv_identity(cache_config) -> str:
    tiers = cache_config.tiers
    if tiers is None:
        return cache_config.kv_format
    return "tiers:" + ",".join(tiers.formats)


def block_tensors(cache, entry_tiers: list[int]) -> Iterator[BlockTensor]:
    """Every block tensor a table of entries in ``entry_tiers`` (each entry's tier) needs,
    skipping tiers it has no entry in."""
    tiered = cache.config.tiers is not None
    for t in range(len(cache.tier_layers)):
        rows = tuple(r for r, x in enumerate(entry_tiers) if x == t)
        if not rows:
            continue
        for i, kv, part, store in cache.stored_tensors(t):
            key = f"{f'T{t}.' if tiered else ''}L{i}.{'kv'[kv]}.{part}"
            yield BlockTensor(key, t, i, kv, part, store, rows)


def signed_scale(cache_config, key: str) -> bool:
    """Whether the scales of block tensor ``key`` may be negative (its format's)."""
    from edgekv.quant import get_format

    parts = key.split(".")
    if cache_config.tiers is not None:
        if not (parts[0][:1] == "T" and parts[0][1:].isdigit()):
            return False
        t = int(parts[0][1:])
        return t < len(cache_config.tiers.formats) and \
            get_format(cache_config.tiers.formats[t]).signed_scale
    layer = parts[0][1:]
    formats = cache_config.formats
    return layer.isdigit() and int(layer) < len(formats) and formats[int(layer)].signed_scale
