"""Per-sequence block tables over one shared BlockPool.

A block table lists, in order, the blocks holding a sequence's tokens: token ``p`` lives in
block ``table[p // block_size]`` at offset ``p % block_size``, i.e. in the flat slot
``table[p // block_size] * block_size + p % block_size``. Tables only grow at the end.
The one exception is copy-on-write: before a sequence writes into a partially filled last
block that it shares with another sequence (after a fork), that entry is swapped for a
private copy. Full blocks are never written again, so sharing them needs no copy.

Prefix cache: ``match_prefix`` starts a new table with the cached blocks of the longest
matching prefix (``prefix_cache.py`` names blocks by chained hashes), and ``register``
records a sequence's newly computed full blocks. A table stops registering once token
eviction has dropped one of its blocks (its entries no longer sit at their positions).

Offload: with a host pool, ``swap_out`` moves a table's unshared blocks to host blocks
(``block_ids[i]`` becomes None and ``host[i]`` holds the host id) and ``swap_in`` brings
them back into fresh device blocks. Shared blocks stay on the device, held as before.

::

    table:   [ b7 | b2 | b9 ]          block_size = 4, num_tokens = 10
    tokens:  0..3  4..7  8 9 _ _        append_slots(seq, 3): fills 2 slots of b9,
                                        allocates one new block for the third token
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekv.cache.block_pool import BlockPool, NoFreeBlocks


@dataclass
class BlockTable:
    block_ids: list[int | None] = field(default_factory=list)  # None: swapped to host
    num_tokens: int = 0  # tokens written (or reserved) in these blocks
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    hashable: bool = True  # False once eviction dropped a block: entries != positions
    host: dict[int, int] = field(default_factory=dict)  # table index -> host block id
    # rotary position of each entry's first slot. Slots of a table are written at
    # consecutive positions, so a new entry starts where its predecessor ends; eviction
    # drops entries (leaving gaps) and a context shift (``reposition``) lowers them.
    positions: list[int] = field(default_factory=list)
    cuts: int = 0  # truncations that dropped entries: cached facts about them are stale

    def position(self, index: int, block_size: int) -> int:
        """Rotary position of the token at cache index ``index`` (its slot may be new)."""
        i = index // block_size
        if i < len(self.positions):
            return self.positions[i] + index % block_size
        last = self.positions[-1] + block_size if self.positions else 0
        return last + (i - len(self.positions)) * block_size + index % block_size


class BlockManager:
    """Allocates and frees blocks for sequences. Pure metadata: bytes move in kv_cache.py.

    Contract: every method either succeeds whole or raises without changing any state.
    Methods that need new bytes (copy-on-write) return the ``(src, dst)`` block pairs the
    caller must copy in the KV storage before writing.
    """

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 tiers: tuple[int, ...] | None = None):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, tiers)  # tiers: blocks per age tier
        self.host_pool = BlockPool(num_host_blocks) if num_host_blocks else None
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
        needed = total - len(t.block_ids) + len(t.host)  # swapped blocks come back first
        if num_new_tokens > 0 and self._last_block_moves(t):
            needed += 1  # copy-on-write of the partially filled last block
        return needed

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_new_tokens) <= self.pool.num_free

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat slot ids of token positions [start, end) of a sequence."""
        t, bs = self.tables[seq_id], self.block_size
        assert 0 <= start <= end <= len(t.block_ids) * bs
        assert not t.host, f"sequence {seq_id} is swapped out"
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
        assert not t.host, f"sequence {seq_id} is swapped out"
        copies = []
        if num_new_tokens > 0 and self._last_block_moves(t):
            (new,) = self.pool.allocate(1)
            old = t.block_ids[-1]
            self.pool.release(old)
            t.block_ids[-1] = new
            copies.append((old, new))
        elif num_new_tokens > 0 and t.num_tokens % self.block_size:
            # writing into a partial block this table alone holds: if it still carries the
            # hash of the full block it was before a truncate (its other holders may have
            # left since), that hash no longer names what it will hold
            self.pool.unregister(t.block_ids[-1])
        total = -(-(t.num_tokens + num_new_tokens) // self.block_size)
        new = self.pool.allocate(total - len(t.block_ids))
        first = t.positions[-1] + self.block_size if t.positions else 0
        t.positions.extend(first + k * self.block_size for k in range(len(new)))
        t.block_ids.extend(new)
        start = t.num_tokens
        t.num_tokens += num_new_tokens
        return self.slots(seq_id, start, t.num_tokens), copies

    def adopt(self, seq_id: int, tiers: list[int], num_tokens: int) -> list[int]:
        """Start a table for new sequence ``seq_id`` of ``num_tokens`` tokens in fresh
        blocks, entry i from age tier ``tiers[i]`` (a loaded session's). Returns the ids;
        raises NoFreeBlocks, changing nothing, if a tier is short."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        assert len(tiers) == -(-num_tokens // self.block_size)
        short = [t for t in set(tiers) if tiers.count(t) > self.pool.num_free_in(t)]
        if short:
            raise NoFreeBlocks(f"sequence {seq_id} needs {tiers.count(short[0])} blocks of "
                               f"tier {short[0]}, {self.pool.num_free_in(short[0])} free")
        got = {t: iter(self.pool.allocate(tiers.count(t), t)) for t in set(tiers)}
        ids = [next(got[t]) for t in tiers]
        self.tables[seq_id] = BlockTable(ids, num_tokens, positions=[
            i * self.block_size for i in range(len(ids))])
        return ids

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (no bytes are copied now). The
        parent must not be swapped out."""
        assert child_id not in self.tables, f"sequence {child_id} exists"
        p = self.tables[parent_id]
        assert not p.host, f"forking swapped-out sequence {parent_id}"
        for b in p.block_ids:
            self.pool.share(b)
        self.tables[child_id] = BlockTable(list(p.block_ids), p.num_tokens, p.num_registered,
                                           p.hashable, positions=list(p.positions))

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens; blocks past them lose a reference.
        A kept last block that becomes partial keeps its prefix hash until this table
        writes into it again: ``append_slots`` then copies it if it is still shared, or
        drops its hash if this table alone holds it by then."""
        t, bs = self.tables[seq_id], self.block_size
        assert 0 <= num_tokens <= t.num_tokens
        keep = -(-num_tokens // bs)
        for i in range(keep, len(t.block_ids)):
            self._release_entry(t, i)
        if keep < len(t.block_ids):
            t.cuts += 1
        del t.block_ids[keep:]
        del t.positions[keep:]
        t.num_tokens = num_tokens
        t.num_registered = min(t.num_registered, num_tokens // bs)

    def evict(self, seq_id: int, indices: list[int]) -> None:
        """Drop the full blocks at table ``indices`` (never the last entry): each loses one
        reference, and the later entries move up. The sequence's later tokens then sit at
        smaller indices: the table holds its cached tokens, not its positions."""
        t = self.tables[seq_id]
        drop = set(indices)
        assert drop and all(0 <= i < len(t.block_ids) - 1 for i in drop), (indices, t)
        assert not t.host, f"evicting from swapped-out sequence {seq_id}"
        for i in sorted(drop):
            self.pool.release(t.block_ids[i])
        t.block_ids = [b for i, b in enumerate(t.block_ids) if i not in drop]
        t.positions = [p for i, p in enumerate(t.positions) if i not in drop]
        t.num_tokens -= len(drop) * self.block_size
        t.num_registered = min(t.num_registered, min(drop))
        t.hashable = False

    def free(self, seq_id: int) -> None:
        """Drop the sequence; each of its blocks (device or host) loses one reference.
        Last block first: the free list reuses the blocks freed first, so a cached prefix
        chain loses its tail before its root (a chain is only found from its root)."""
        t = self.tables.pop(seq_id)
        for i in reversed(range(len(t.block_ids))):
            self._release_entry(t, i)

    def shift_plan(self, seq_id: int) -> list[tuple[int, int]]:
        """Context shift: (table index, delta) of each entry whose rotary position is not
        its cache index; moving it down by ``delta`` makes every position its index."""
        t, bs = self.tables[seq_id], self.block_size
        return [(i, p - i * bs) for i, p in enumerate(t.positions) if p != i * bs]

    def reposition(self, seq_id: int, index: int, block: int | None = None) -> None:
        """Commit one entry's context shift: its first position becomes its cache index.
        ``block``: a fresh block (from ``pool.allocate``) already holding the re-rotated
        bytes, which replaces the entry's block (this table's reference to the old one is
        dropped); None: the bytes were rewritten in place (the entry's block must be held
        by this table alone, and it loses its prefix hash)."""
        t = self.tables[seq_id]
        old = t.block_ids[index]
        assert old is not None, f"sequence {seq_id}: entry {index} is swapped out"
        if block is None:
            assert not self.pool.is_shared(old), f"rewriting shared block {old} in place"
            self.pool.unregister(old)
        else:
            t.block_ids[index] = block
            self.pool.release(old)
        t.positions[index] = index * self.block_size

    # ---- prefix cache ------------------------------------------------------------------
    def match_prefix(self, seq_id: int, hashes: list[bytes], max_blocks: int) -> int:
        """Start a table for new sequence ``seq_id`` holding the cached blocks of its
        longest matching prefix, at most ``max_blocks``; returns the number of blocks hit
        (their tokens need no compute). ``hashes``: the sequence's full-block chain."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        hit = []
        for h in hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        for b in hit:
            self.pool.take(b)
        n = len(hit)
        self.tables[seq_id] = BlockTable(hit, n * self.block_size, num_registered=n,
                                         positions=[i * self.block_size for i in range(n)])
        return n

    def register(self, seq_id: int, hashes: list[bytes], num_computed: int) -> int:
        """Offer the sequence's newly computed full blocks (of its first ``num_computed``
        tokens, whose bytes are written) to the prefix cache; returns how many joined it."""
        t = self.tables.get(seq_id)
        if t is None or not t.hashable:
            return 0
        end = min(num_computed // self.block_size, len(hashes), len(t.block_ids))
        added = 0
        for i in range(t.num_registered, end):
            b = t.block_ids[i]
            if b is not None:
                added += self.pool.register(b, hashes[i])
        t.num_registered = max(t.num_registered, end)
        return added

    # ---- offload -----------------------------------------------------------------------
    def num_swappable(self, seq_id: int) -> int:
        """Device blocks ``swap_out`` would move (those this table alone holds)."""
        t = self.tables.get(seq_id)
        if t is None:
            return 0
        return sum(b is not None and not self.pool.is_shared(b) for b in t.block_ids)

    def can_swap_out(self, seq_id: int) -> bool:
        n = self.num_swappable(seq_id)
        return self.host_pool is not None and 0 < n <= self.host_pool.num_free

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move the table's unshared blocks to host blocks. Returns the (device, host)
        pairs whose bytes the caller must copy before any device block is written again."""
        assert self.can_swap_out(seq_id)
        t = self.tables[seq_id]
        idx = [i for i, b in enumerate(t.block_ids) if b is not None
               and not self.pool.is_shared(b)]
        pairs = list(zip([t.block_ids[i] for i in idx], self.host_pool.allocate(len(idx)),
                         strict=True))
        for i, (dev, host) in zip(idx, pairs, strict=True):
            self.pool.release(dev)  # keeps its prefix hash: still a cache hit until reused
            t.block_ids[i] = None
            t.host[i] = host
        return pairs

    def is_swapped(self, seq_id: int) -> bool:
        t = self.tables.get(seq_id)
        return t is not None and bool(t.host)

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Bring swapped blocks back into fresh device blocks. Returns the (host, device)
        pairs whose bytes the caller must copy before any host block is reused. Raises
        NoFreeBlocks, changing nothing, if the device pool is short."""
        t = self.tables[seq_id]
        idx = sorted(t.host)
        pairs = list(zip([t.host[i] for i in idx], self.pool.allocate(len(idx)), strict=True))
        for i, (host, dev) in zip(idx, pairs, strict=True):
            self.host_pool.release(host)
            t.block_ids[i] = dev
        t.host.clear()
        return pairs

    # ---- invariants --------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Pool invariants hold, and each block's ref count equals its holders in tables."""
        self.pool.check_integrity()
        holders = [0] * self.pool.num_blocks
        host = [0] * (self.host_pool.num_blocks if self.host_pool else 0)
        for sid, t in self.tables.items():
            assert len(t.block_ids) == -(-t.num_tokens // self.block_size), (
                f"sequence {sid}: {len(t.block_ids)} blocks for {t.num_tokens} tokens")
            dev = [b for b in t.block_ids if b is not None]
            assert len(set(dev)) == len(dev), f"sequence {sid} repeats a block"
            assert sorted(t.host) == [i for i, b in enumerate(t.block_ids) if b is None]
            assert t.num_registered <= len(t.block_ids)
            assert len(t.positions) == len(t.block_ids), f"sequence {sid}: positions"
            gaps = [b - a for a, b in zip(t.positions, t.positions[1:], strict=False)]
            assert all(g >= self.block_size for g in gaps), f"sequence {sid}: {t.positions}"
            for b in dev:
                holders[b] += 1
            for h in t.host.values():
                host[h] += 1
        assert holders == self.pool.ref_counts, "ref counts differ from block-table holders"
        if self.host_pool is not None:
            self.host_pool.check_integrity()
            assert host == self.host_pool.ref_counts, "host ref counts differ from holders"

    def _last_block_moves(self, t: BlockTable) -> bool:
        """Whether writing into the partial last block needs a copy first: it is shared,
        or (age tiers, after a truncate) it was demoted out of the tier new tokens go to."""
        partial = t.num_tokens % self.block_size != 0
        b = t.block_ids[-1] if partial else None
        return b is not None and (self.pool.is_shared(b) or self.pool.tier_of(b) != 0)

    def _release_entry(self, t: BlockTable, i: int) -> None:
        if t.block_ids[i] is None:
            self.host_pool.release(t.host.pop(i))
        else:
            self.pool.release(t.block_ids[i])


__all__ = ["BlockManager", "BlockTable", "NoFreeBlocks"]
