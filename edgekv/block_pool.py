"""Block pool: which KV blocks are free, and how many sequences hold each one.

Pure Python metadata: no tensors here. The bytes of block ``i`` live in every layer's
storage at index ``i`` (see ``kv_cache.py``); this module only hands ids out and takes
them back.

Free-list order: ``allocate`` takes the block at the head of the queue and a block whose
last reference is dropped joins its tail. The block freed longest ago is therefore reused
first (FIFO = least-recently-freed first), which is the order a prefix cache wants when it
lets freed blocks linger as reusable.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation needs more blocks than the pool has free."""


class BlockPool:
    def __init__(self, num_blocks: int):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks  # number of block tables holding each block
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each). All or nothing: raises NoFreeBlocks."""
        if n > len(self.free_ids):
            raise NoFreeBlocks(f"need {n} blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            assert self.ref_counts[i] == 0, f"block {i} on the free list is referenced"
            self.ref_counts[i] = 1
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
            self.free_ids.append(block_id)

    def is_shared(self, block_id: int) -> bool:
        return self.ref_counts[block_id] > 1

    def check_integrity(self) -> None:
        """free + used == total; the free list holds exactly the unreferenced ids, once."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        assert all(0 <= i < self.num_blocks for i in free), "foreign id on the free list"
        for i, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"block {i} has ref count {rc}"
            assert (rc == 0) == (i in free), f"block {i}: ref count {rc}, free={i in free}"
        assert self.num_free + sum(rc > 0 for rc in self.ref_counts) == self.num_blocks
