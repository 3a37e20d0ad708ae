"""A pool of paged, quantized KV blocks that transformers caches store their sequences in.

The pool is EdgeKV's own cache machinery, unchanged: a ``PagedKVCache`` holds the bytes
(per layer: codes and scales of ``num_blocks`` blocks), a ``BlockManager`` the block table
of each sequence. One batch row of a transformers cache is one sequence here. Several
caches may share one pool (a fixed budget allocated once); each frees its sequences'
blocks when it is dropped or reset.

Notation: B batch rows, Hkv KV heads, n new tokens, L cached tokens, D head_dim.
"""

from __future__ import annotations

import torch

from edgekv.cache.block_manager import BlockManager, NoFreeBlocks
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.config import CacheConfig
from edgekv.quant import QuantizedKV


class KVPool:
    """KV storage and block tables for sequences identified by ids from ``new_sequences``.

    Contract: a sequence holds the same blocks in every layer; ``reserve`` grows every
    listed sequence or none; ``write`` changes only the slots of the tokens it is given;
    ``read`` changes nothing. Not thread-safe.
    """

    def __init__(self, config: CacheConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.storage = PagedKVCache(config, device)
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self._next_id = 0

    @property
    def device(self) -> torch.device:
        return self.storage.device

    # ---- sequences ---------------------------------------------------------------------
    def new_sequences(self, n: int) -> list[int]:
        """``n`` fresh, empty sequence ids (blocks come with ``reserve``)."""
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        return ids

    def num_tokens(self, seq_id: int) -> int:
        t = self.blocks.tables.get(seq_id)
        return 0 if t is None else t.num_tokens

    def reserve(self, seq_ids: list[int], num_tokens: int) -> None:
        """Grow each sequence to ``num_tokens`` reserved slots, copying a shared partial last
        block first (copy-on-write). All or nothing: raises NoFreeBlocks, changing nothing."""
        grow = [(s, num_tokens - self.num_tokens(s)) for s in seq_ids]
        needed = sum(self.blocks.blocks_needed(s, n) for s, n in grow if n > 0)
        if needed > self.blocks.pool.num_free:
            c = self.config
            raise NoFreeBlocks(
                f"the EdgeKV cache pool is full: {len(seq_ids)} sequence(s) of {num_tokens:,} "
                f"tokens need {needed} more blocks, {self.blocks.pool.num_free} of "
                f"{c.num_blocks} are free ({c.num_blocks * c.block_size:,} tokens of "
                f"{c.kv_format}); give the cache a larger kv_memory")
        for s, n in grow:
            if n > 0:
                _, copies = self.blocks.append_slots(s, n)
                self.storage.copy_blocks(copies)

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all of ``seq_id``'s blocks (no bytes copied now)."""
        (child,) = self.new_sequences(1)
        if seq_id in self.blocks.tables:
            self.blocks.fork(seq_id, child)
        return child

    def truncate(self, seq_ids: list[int], num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens of each sequence."""
        for s in seq_ids:
            if self.num_tokens(s) > num_tokens:
                self.blocks.truncate(s, num_tokens)

    def free(self, seq_ids: list[int]) -> None:
        """Drop the sequences; their blocks return to the pool once no sequence holds them."""
        for s in seq_ids:
            if s in self.blocks.tables:
                self.blocks.free(s)

    # ---- bytes -------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq_ids: list[int],
              start: int) -> None:
        """Quantize and store new tokens at positions [start, start + n) of each sequence.

        k, v: (B, Hkv, n, D), row b belonging to ``seq_ids[b]``; the slots must be reserved.
        """
        B, H, n, D = k.shape
        slots = [x for s in seq_ids for x in self.blocks.slots(s, start, start + n)]
        flat_k = k.transpose(1, 2).reshape(B * n, H, D)  # (B*n, Hkv, D), row-major like slots
        flat_v = v.transpose(1, 2).reshape(B * n, H, D)
        self.storage.write(layer, flat_k, flat_v, torch.tensor(slots, dtype=torch.long))

    def read(self, layer: int, seq_ids: list[int], length: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of the first ``length`` tokens: each (B, Hkv, length, D)."""
        c, fmt = self.config, self.storage.format
        nb = -(-length // c.block_size)
        table = torch.tensor([self.blocks.block_ids(s)[:nb] for s in seq_ids],
                             dtype=torch.long, device=self.device)  # (B, nb)
        out = []
        for store in self.storage.layers[layer]:
            part = QuantizedKV(store.data[table],  # (B, nb, Hkv, block_size, packed_dim)
                               None if store.scale is None else store.scale[table],
                               None if store.zero is None else store.zero[table])
            x = fmt.decode(part)  # (B, nb, Hkv, block_size, D) fp32, storage basis
            x = x.permute(0, 2, 1, 3, 4).reshape(len(seq_ids), c.num_kv_heads, -1, c.head_dim)
            out.append(fmt.from_storage_basis(x[:, :, :length]).to(dtype))  # (B, Hkv, L, D)
        return out[0], out[1]

    # ---- accounting --------------------------------------------------------------------
    def stats(self) -> dict:
        """Blocks and bytes in use (``PagedKVCache.stats``: blocks_used, bytes_used, ...)."""
        return self.storage.stats(self.blocks)

    def check_integrity(self) -> None:
        self.blocks.check_integrity()
