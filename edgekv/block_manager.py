"""Per-sequence block tables over one shared BlockPool.

A block table lists, in order, the blocks holding a sequence's tokens: token ``p`` lives in
block ``table[p // block_size]`` at offset ``p % block_size``, i.e. in the flat slot
``table[p // block_size] * block_size + p % block_size``. Tables only grow at the end.
The one exception is copy-on-write: before a sequence writes into a partially filled last
block that it shares with another sequence (after a fork), that entry is swapped for a
private copy. Full blocks are never written again, so sharing them needs no copy.

::

    table:   [ b7 | b2 | b9 ]          block_size = 4, num_tokens = 10
    tokens:  0..3  4..7  8 9 _ _        append_slots(seq, 3): fills 2 slots of b9,
                                        allocates one new block for the third token
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_pool import BlockPool, NoFreeBlocks


@dataclass
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens written (or reserved) in these blocks


class BlockManager:
    """Allocates and frees blocks for sequences. Pure metadata: bytes move in kv_cache.py.

    Contract: every method either succeeds whole or raises without changing any state.
    Methods that need new bytes (copy-on-write) return the ``(src, dst)`` block pairs the
    caller must copy in the KV storage before writing.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[int, BlockTable] = {}

    # ---- queries -----------------------------------------------------------------------
    def num_tokens(self, seq_id: int) -> int:
        return self.tables[seq_id].num_tokens

    def block_ids(self, seq_id: int) -> list[int]:
        return self.tables[seq_id].block_ids

    def blocks_needed(self, seq_id: int, num_new_tokens: int) -> int:
        """Free blocks that ``append_slots(seq_id, num_new_tokens)`` would take."""
        t = self.tables.get(seq_id, BlockTable())
        total = -(-(t.num_tokens + num_new_tokens) // self.block_size)
        needed = total - len(t.block_ids)
        if num_new_tokens > 0 and self._last_block_shared(t):
            needed += 1  # copy-on-write of the partially filled last block
        return needed

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_new_tokens) <= self.pool.num_free

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat slot ids of token positions [start, end) of a sequence."""
        t, bs = self.tables[seq_id], self.block_size
        assert 0 <= start <= end <= len(t.block_ids) * bs
        return [t.block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- changes -----------------------------------------------------------------------
    def append_slots(self, seq_id: int, num_new_tokens: int) -> tuple[list[int], list[tuple]]:
        """Reserve slots for the next ``num_new_tokens`` tokens of ``seq_id`` (created if new).

        Returns (slots, copies): the flat slot of each new token, and the (src, dst) block
        pairs to copy before writing. Raises NoFreeBlocks, changing nothing, if the pool
        is short.
        """
        assert num_new_tokens >= 0
        needed = self.blocks_needed(seq_id, num_new_tokens)
        if needed > self.pool.num_free:
            raise NoFreeBlocks(f"sequence {seq_id} needs {needed} blocks, "
                               f"{self.pool.num_free} free")
        t = self.tables.setdefault(seq_id, BlockTable())
        copies = []
        if num_new_tokens > 0 and self._last_block_shared(t):
            (new,) = self.pool.allocate(1)
            old = t.block_ids[-1]
            self.pool.release(old)
            t.block_ids[-1] = new
            copies.append((old, new))
        total = -(-(t.num_tokens + num_new_tokens) // self.block_size)
        t.block_ids.extend(self.pool.allocate(total - len(t.block_ids)))
        start = t.num_tokens
        t.num_tokens += num_new_tokens
        return self.slots(seq_id, start, t.num_tokens), copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (no bytes are copied now)."""
        assert child_id not in self.tables, f"sequence {child_id} exists"
        p = self.tables[parent_id]
        for b in p.block_ids:
            self.pool.share(b)
        self.tables[child_id] = BlockTable(list(p.block_ids), p.num_tokens)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens; blocks past them lose a reference."""
        t = self.tables[seq_id]
        assert 0 <= num_tokens <= t.num_tokens
        keep = -(-num_tokens // self.block_size)
        for b in t.block_ids[keep:]:
            self.pool.release(b)
        del t.block_ids[keep:]
        t.num_tokens = num_tokens

    def evict(self, seq_id: int, indices: list[int]) -> None:
        """Drop the full blocks at table ``indices`` (never the last entry): each loses one
        reference, and the later entries move up. The sequence's later tokens then sit at
        smaller indices: the table holds its cached tokens, not its positions."""
        t = self.tables[seq_id]
        drop = set(indices)
        assert drop and all(0 <= i < len(t.block_ids) - 1 for i in drop), (indices, t)
        for i in sorted(drop):
            self.pool.release(t.block_ids[i])
        t.block_ids = [b for i, b in enumerate(t.block_ids) if i not in drop]
        t.num_tokens -= len(drop) * self.block_size

    def free(self, seq_id: int) -> None:
        """Drop the sequence; each of its blocks loses one reference."""
        for b in self.tables.pop(seq_id).block_ids:
            self.pool.release(b)

    # ---- invariants --------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Pool invariants hold, and each block's ref count equals its holders in tables."""
        self.pool.check_integrity()
        holders = [0] * self.pool.num_blocks
        for sid, t in self.tables.items():
            assert len(t.block_ids) == -(-t.num_tokens // self.block_size), (
                f"sequence {sid}: {len(t.block_ids)} blocks for {t.num_tokens} tokens")
            assert len(set(t.block_ids)) == len(t.block_ids), f"sequence {sid} repeats a block"
            for b in t.block_ids:
                holders[b] += 1
        assert holders == self.pool.ref_counts, "ref counts differ from block-table holders"

    def _last_block_shared(self, t: BlockTable) -> bool:
        partial = t.num_tokens % self.block_size != 0
        return partial and self.pool.is_shared(t.block_ids[-1])


__all__ = ["BlockManager", "BlockTable", "NoFreeBlocks"]
