"""CPU offload: moving a sequence's blocks between the device pool and a host pool.

The host pool is a second ``PagedKVCache`` (pinned memory when the device is CUDA, plain
CPU tensors otherwise, so CI runs the same path between two CPU pools) indexed by the
BlockManager's ``host_pool`` ids. Blocks move in their stored form, codes and scales
together: an INT4 block moves a quarter of the bytes of an FP16 one.

Copies happen at once, synchronously, inside the scheduler's decision, so a block freed
by a swap can be reallocated and written later in the same step without racing the copy.
A swap is all or nothing: if its copy raises, the table points at the blocks it held before
(their bytes untouched, since nothing reused them in between).
"""

from __future__ import annotations

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.kv_cache import PagedKVCache


def copy_blocks_between(src: PagedKVCache, dst: PagedKVCache,
                        pairs: list[tuple[int, int]]) -> None:
    """dst block d <- src block s for each (s, d), every layer, codes and scales."""
    if not pairs:
        return
    s_idx = torch.tensor([s for s, _ in pairs], device=src.device)
    d_idx = torch.tensor([d for _, d in pairs], device=dst.device)
    for (*_, s_t), (*_, d_t) in zip(src.stored_tensors(), dst.stored_tensors(), strict=True):
        d_t[d_idx] = s_t[s_idx].to(dst.device)  # (n, num_kv_heads, block_size, ...)


class Offloader:
    """Swaps whole tables' unshared blocks out to the host and back. Mutates the manager's
    tables and both caches' bytes; counts swaps and bytes moved."""

    def __init__(self, manager: BlockManager, device_cache: PagedKVCache,
                 host_cache: PagedKVCache):
        assert manager.host_pool is not None
        assert host_cache.config.num_blocks == manager.host_pool.num_blocks
        self.manager, self.device_cache, self.host_cache = manager, device_cache, host_cache
        self.bytes_per_block = device_cache.config.bytes_per_block
        self.swaps_out = self.swaps_in = 0  # sequences moved
        self.blocks_out = self.blocks_in = 0

    def swap_out(self, seq_id: int) -> int:
        pairs = self.manager.swap_out(seq_id)
        try:
            copy_blocks_between(self.device_cache, self.host_cache, pairs)
        except BaseException:
            self._undo(seq_id, [(h, d) for d, h in pairs], out=True)
            raise
        self.swaps_out += 1
        self.blocks_out += len(pairs)
        return len(pairs)

    def swap_in(self, seq_id: int) -> int:
        pairs = self.manager.swap_in(seq_id)
        try:
            copy_blocks_between(self.host_cache, self.device_cache, pairs)
        except BaseException:
            self._undo(seq_id, pairs, out=False)
            raise
        self.swaps_in += 1
        self.blocks_in += len(pairs)
        return len(pairs)

    def _undo(self, seq_id: int, pairs: list[tuple[int, int]], out: bool) -> None:
        """Put back the table entries of a swap whose copy failed. ``pairs``: (host, device)
        blocks; ``out``: the swap moved them to the host (else back to the device). The
        blocks released by the swap are still free, so taking them back changes no bytes."""
        mgr = self.manager
        t = mgr.tables[seq_id]
        where = {h: i for i, h in t.host.items()}
        for host, dev in pairs:
            if out:  # the device block was released (keeping its hash), the host one taken
                i = where[host]
                mgr.pool.take(dev)
                del t.host[i]
                t.block_ids[i] = dev
                mgr.host_pool.release(host)
            else:  # the host block was released, a fresh device block taken
                i = t.block_ids.index(dev)
                mgr.host_pool.take(host)
                t.host[i] = host
                t.block_ids[i] = None
                mgr.pool.release(dev)

    def stats(self) -> dict:
        hp, b = self.manager.host_pool, self.bytes_per_block
        return {
            "host_blocks_total": hp.num_blocks,
            "host_blocks_used": hp.num_used,
            "swaps_out": self.swaps_out,
            "swaps_in": self.swaps_in,
            "swapped_out_blocks": self.blocks_out,
            "swapped_in_blocks": self.blocks_in,
            "swap_bytes_out": self.blocks_out * b,
            "swap_bytes_in": self.blocks_in * b,
            "swap_bytes_per_block": b,
        }


__all__ = ["Offloader", "copy_blocks_between"]
