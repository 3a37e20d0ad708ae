"""Paged KV storage: per-layer tensors of quantized blocks, and writes into their slots.

Layout of one layer (docs/design.md, "The KV block"), for K and for V alike::

    data  : (num_blocks, num_kv_heads, block_size, packed_dim)   format's storage dtype
    scale : (num_blocks, num_kv_heads, block_size, num_groups)   fp16 / e4m3 (quantized)
    zero  : (num_blocks, num_kv_heads, block_size, num_groups)   fp16   (asymmetric formats)

Head-major inside a block, so one (block, head) tile is contiguous. Scales are indexed by
block id, so they travel with their block when it is shared, copied or saved. Block ids
are common to all layers: the BlockManager's tables index every layer's storage. Each
layer has its own format (``CacheConfig.formats``): dtypes and widths may differ by layer.

Age tiers (``config.tiers``): every layer has one storage per stored tier, each indexed by
the ids of its tier's range less the range's start; ``layers`` is the newest tier's (new
tokens are written there: its ids are their own local ids), ``tier_layers[t]`` tier t's.
A block moves between tiers by ``transcode``: read from its codes, quantized again.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.config import CacheConfig
from edgekv.kernels import write_kv
from edgekv.kernels.tiered import TierStore, read_blocks, tier_index
from edgekv.quant import KVFormat, QuantizedKV


class PagedKVCache:
    """Owns the KV bytes of every layer. Does not decide which slots are used.

    ``write`` quantizes and stores new K/V at flat slot ids chosen by a BlockManager;
    ``copy_blocks`` performs the copies the manager asks for (copy-on-write).
    """

    def __init__(self, config: CacheConfig, device: str | torch.device = "cpu",
                 pin_memory: bool = False):
        self.config = config
        self.device = torch.device(device)
        self.pin_memory = pin_memory  # a host pool for offload from a CUDA device
        self.formats = config.formats  # one per layer
        tiers = config.tiers
        cfgs = [config] if tiers is None else [config.tier(t) for t in range(len(tiers.blocks))]
        self.offsets = (0,) if tiers is None else tiers.offsets  # first id of each tier
        # tier -> layer -> (K, V); tier 0 is ``layers``
        self.tier_layers: list[list[tuple[QuantizedKV, QuantizedKV]]] = [
            [(self._empty(f, c.num_blocks), self._empty(f, c.num_blocks)) for f in c.formats]
            for c in cfgs]
        self.tier_formats = [c.formats[0] for c in cfgs]  # tiers store one format each
        self.layers = self.tier_layers[0]

    @property
    def format(self) -> KVFormat:
        """The format of every layer; ValueError where layers differ (read ``formats``)."""
        return self.config.format

    def _empty(self, f: KVFormat, num_blocks: int) -> QuantizedKV:
        c = self.config
        shape = (num_blocks, c.num_kv_heads, c.block_size)
        kw = {"device": self.device, "pin_memory": self.pin_memory}
        data = torch.zeros(*shape, f.packed_dim(c.head_dim), dtype=f.storage_dtype, **kw)
        groups = (*shape, f.num_groups(c.head_dim))
        scale = torch.ones(groups, dtype=f.scale_dtype, **kw) if f.has_scale else None
        zero = torch.zeros(groups, dtype=f.scale_dtype, **kw) if f.has_zero else None
        return QuantizedKV(data, scale, zero)

    # ---- bytes in --------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize and store new tokens (fused Triton kernel on CUDA, torch on CPU).

        k, v:  (num_tokens, num_kv_heads, head_dim)  in the original basis
        slots: (num_tokens,) int64 flat slot ids (block_id * block_size + offset)
        Mutates this layer's storage at those slots only.
        """
        c = self.config
        if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (c.num_kv_heads, c.head_dim):
            raise ValueError(f"expected k and v of shape (tokens, {c.num_kv_heads}, "
                             f"{c.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        k_store, v_store = self.layers[layer]
        write_kv(k_store, v_store, k.to(self.device), v.to(self.device),
                 slots.to(device=self.device, dtype=torch.long), self.formats[layer])

    def stored_tensors(self, tier: int = 0) -> Iterator[tuple[int, int, str, torch.Tensor]]:
        """(layer, kv, part, tensor) for every tensor of every layer's K (kv 0) and V (kv 1)
        storage in ``tier``: "data", then "scale" and "zero" where the format has them.
        The one loop over the storage: copies, swaps and session files walk it."""
        for i, layer in enumerate(self.tier_layers[tier]):
            for kv, store in enumerate(layer):
                for part in ("data", "scale", "zero"):
                    x = getattr(store, part)
                    if x is not None:  # (blocks, num_kv_heads, block_size, packed | groups)
                        yield i, kv, part, x

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer, codes and scales together (a pair
        across age tiers is transcoded)."""
        same = [(s, d) for s, d in pairs if self.tier_of(s) == self.tier_of(d)]
        self.transcode([p for p in pairs if p not in same])
        for t in sorted({self.tier_of(s) for s, _ in same}):
            off = self.offsets[t]
            mine = [(s - off, d - off) for s, d in same if self.tier_of(s) == t]
            src = torch.tensor([s for s, _ in mine], device=self.device)
            dst = torch.tensor([d for _, d in mine], device=self.device)
            for _, _, _, x in self.stored_tensors(t):
                x[dst] = x[src]

    # ---- age tiers ---------------------------------------------------------------------
    def tier_of(self, block: int) -> int:
        return tier_index(self.offsets, block)

    def tier_stores(self, layer: int) -> list[TierStore]:
        """The layer's storage of each tier, newest first (kernels/tiered.py)."""
        return [TierStore(k, v, fmt, off) for (k, v), fmt, off in zip(
            (tier[layer] for tier in self.tier_layers), self.tier_formats, self.offsets,
            strict=True)]

    def transcode(self, pairs: list[tuple[int, int]]) -> None:
        """Block src's tokens into block dst of another tier, in every layer: read from
        src's codes, quantized in dst's format (age tiers' demotion). Writes dst only."""
        if not pairs:
            return
        B = self.config.block_size
        for t in sorted({self.tier_of(d) for _, d in pairs}):
            mine = [(s, d) for s, d in pairs if self.tier_of(d) == t]
            off = torch.arange(B, device=self.device)
            slots = torch.cat([(d - self.offsets[t]) * B + off for _, d in mine])  # (n*B,)
            for layer, (k_store, v_store) in enumerate(self.tier_layers[t]):
                k, v = read_blocks(self.tier_stores(layer), [s for s, _ in mine])
                k, v = (x.transpose(1, 2).flatten(0, 1) for x in (k, v))  # (n*B, Hkv, D)
                write_kv(k_store, v_store, k, v, slots, self.tier_formats[t])

    # ---- accounting --------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes actually allocated by the storage tensors (equals config.bytes_total)."""
        return sum(x.numel() * x.element_size() for t in range(len(self.tier_layers))
                   for *_, x in self.stored_tensors(t))

    def stats(self, manager: BlockManager) -> dict:
        """What the cache costs now: blocks, bytes, live tokens, utilisation.

        ``live_tokens`` counts each filled slot once, even when sequences share its block;
        ``utilization`` is live tokens over the slots of the blocks in use.
        """
        c, bs = self.config, self.config.block_size
        filled: dict[int, int] = {}
        for t in manager.tables.values():
            for i, b in enumerate(t.block_ids):
                if b is None:  # swapped out to the host pool
                    continue
                n = min(bs, t.num_tokens - i * bs)
                filled[b] = max(filled.get(b, 0), n)
        pool = manager.pool
        used = pool.num_used
        live = sum(filled.values())
        out = {
            "kv_format": c.kv_format,
            "block_size": bs,
            "blocks_total": c.num_blocks,
            "blocks_used": used,
            "blocks_free": c.num_blocks - used,
            "bytes_total": c.bytes_total,
            "bytes_used": used * c.bytes_per_block,
            "bytes_per_token": c.bytes_per_token,
            "live_tokens": live,
            "num_seqs": len(manager.tables),
            "cached_blocks": pool.num_cached,  # prefix-cache blocks, used or free
            "utilization": live / (used * bs) if used else 0.0,
        }
        if c.tiers is not None:  # bytes and tokens per age tier, newest first
            tiers = []
            for t, fmt in enumerate(c.tiers.formats):
                tc = c.tier(t)
                n = tc.num_blocks - pool.num_free_in(t)
                tiers.append({
                    "format": fmt,
                    "tokens_max": c.tiers.tokens[t] if t < len(c.tiers.tokens) else None,
                    "live_tokens": sum(k for b, k in filled.items() if pool.tier_of(b) == t),
                    "blocks_total": tc.num_blocks, "blocks_used": n,
                    "bytes_total": tc.bytes_total, "bytes_used": n * tc.bytes_per_block,
                })
            out["tiers"] = tiers
            out["bytes_used"] = sum(t["bytes_used"] for t in tiers)
        return out
