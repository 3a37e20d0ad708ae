"""Block pool: which KV blocks are free, how many sequences hold each, and which hold a
cached prefix.

Pure Python metadata: no tensors here. The bytes of block ``i`` live in every layer's
storage at index ``i`` (see ``kv_cache.py``); this module only hands ids out and takes
them back.

Free-list order: ``allocate`` takes the block at the head of the queue and a block whose
last reference is dropped joins its tail. The block freed longest ago is therefore reused
first (FIFO = least-recently-freed first). That is the prefix cache's eviction order (LRU):

::

    free list:  head [ b4  b9  b2* b7* ] tail        * = still holds a cached prefix block
                 ^ allocate() takes b4 first; b2 keeps its hash until it is reallocated

A full block may carry a content hash (``prefix_cache.block_hash``); ``cached`` maps each
hash to the one block holding it. A freed block keeps its hash and stays findable by
``lookup`` until ``allocate`` hands it out again (its hash is dropped then, since it will be
overwritten). ``take`` (a cache hit) adds a holder; on a free block it also takes it off
the free list, wherever it sits.

Age tiers (``tiers``: blocks per stored tier, edgekv/tiers): the ids split into one
contiguous range per tier, each with its own free list. ``allocate`` takes from the
newest tier unless told another; ``num_free`` counts that tier's free blocks (where new
tokens go), ``num_free_in(t)`` any tier's.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation needs more blocks than the pool has free."""


class BlockPool:
    def __init__(self, num_blocks: int, tiers: tuple[int, ...] | None = None):
        assert num_blocks > 0
        tiers = tiers or (num_blocks,)
        assert sum(tiers) == num_blocks and min(tiers) > 0, (num_blocks, tiers)
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks  # number of block tables holding each block
        self.starts = [sum(tiers[:t]) for t in range(len(tiers) + 1)]  # tier t: [s_t, s_t+1)
        # per tier, free ids in LRU order (head = freed longest ago); ordered dicts so that
        # a cache hit can take a block from the middle in O(1)
        self._tier_free: list[OrderedDict[int, None]] = [
            OrderedDict.fromkeys(range(a, b))
            for a, b in zip(self.starts, self.starts[1:], strict=False)]
        self._free = self._tier_free[0]
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # content hash -> block id

    @property
    def free_ids(self) -> list[int]:
        """Free block ids of the newest tier, next to be allocated first."""
        return list(self._free)

    @property
    def num_free(self) -> int:
        """Free blocks where new tokens go (the newest tier)."""
        return len(self._free)

    def num_free_in(self, tier: int) -> int:
        return len(self._tier_free[tier])

    @property
    def num_tiers(self) -> int:
        return len(self._tier_free)

    def tier_of(self, block_id: int) -> int:
        return bisect.bisect_right(self.starts, block_id) - 1

    @property
    def num_used(self) -> int:
        return self.num_blocks - sum(len(f) for f in self._tier_free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix block, in use or free."""
        return len(self.cached)

    def allocate(self, n: int = 1, tier: int = 0) -> list[int]:
        """Take ``n`` free blocks of ``tier`` (ref count 1 each), least recently freed
        first, dropping any cached hash they held. All or nothing: raises NoFreeBlocks."""
        free = self._tier_free[tier]
        if n > len(free):
            raise NoFreeBlocks(f"need {n} blocks, {len(free)} free")
        ids = [free.popitem(last=False)[0] for _ in range(n)]
        for i in ids:
            assert self.ref_counts[i] == 0, f"block {i} on the free list is referenced"
            self.ref_counts[i] = 1
            self.unregister(i)
        return ids

    def share(self, block_id: int) -> None:
        """One more holder of an allocated block (a fork)."""
        assert self.ref_counts[block_id] > 0, f"sharing free block {block_id}"
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        """Drop one reference; the block returns to the free list's tail at zero."""
        assert self.ref_counts[block_id] > 0, f"releasing free block {block_id}"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self._tier_free[self.tier_of(block_id)][block_id] = None

    def is_shared(self, block_id: int) -> bool:
        return self.ref_counts[block_id] > 1

    # ---- prefix cache ------------------------------------------------------------------
    def register(self, block_id: int, h: bytes) -> bool:
        """Record that allocated full block ``block_id`` holds content ``h``. False (and no
        change) if another block already holds ``h`` or this one holds another hash."""
        assert self.ref_counts[block_id] > 0, f"registering free block {block_id}"
        if h in self.cached or self.block_hash[block_id] is not None:
            return False
        self.cached[h] = block_id
        self.block_hash[block_id] = h
        return True

    def unregister(self, block_id: int) -> None:
        """Forget the block's hash (it is about to be overwritten)."""
        h = self.block_hash[block_id]
        if h is not None:
            del self.cached[h]
            self.block_hash[block_id] = None

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def take(self, block_id: int) -> None:
        """A cache hit: one more holder; a free block leaves the free list."""
        if self.ref_counts[block_id] == 0:
            del self._tier_free[self.tier_of(block_id)][block_id]
        self.ref_counts[block_id] += 1

    def check_integrity(self) -> None:
        """free + used == total; the free list holds exactly the unreferenced ids, once;
        the hash map and per-block hashes agree."""
        free = set().union(*self._tier_free)
        for t, ids in enumerate(self._tier_free):
            assert all(self.starts[t] <= i < self.starts[t + 1] for i in ids), (
                f"foreign id on tier {t}'s free list")
        for i, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"block {i} has ref count {rc}"
            assert (rc == 0) == (i in free), f"block {i}: ref count {rc}, free={i in free}"
        assert len(free) + sum(rc > 0 for rc in self.ref_counts) == self.num_blocks
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"block {b}: hash map and block hash differ"
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
