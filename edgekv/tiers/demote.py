"""Demotion: blocks move down the age tiers as their tokens age, or early under pressure.

After every engine step ``age`` moves each block whose newest token has left its tier's
reach (spec.py) into a block of the tier it is due in: the bytes are read from its codes
and quantized again (``PagedKVCache.transcode``; scripts/bench_demotion.py measures what
the second rounding costs: +0.5 % error for int8 -> int4 against quantizing once), then
every table holding it points at the new block, which inherits its holders and its prefix
hash, and the old block is free. A block shared by sequences of different lengths is due
where the youngest holder puts it.

::

    table (block_size 4, tiers int8:8,int4), 17 tokens:
      [ b40 b41 | b3 b7 b9 ]        b40, b41: int4 (ids of tier 1); b3, b7, b9: int8
        0..7      8..11 12..15 16   b3's newest token (11) has 5 tokens after it: int8
                                    still; at 21 tokens it has 9 (>= 8): it moves

Pressure: when the newest tier is short of blocks for a step (``relieve``), its oldest
full blocks that no exact-window token lives in move down before they are due (a tier
short of room for what moves into it makes room the same way, down to the last tier,
which nothing leaves). Every move is all or nothing: the new blocks are written before any
table changes, and a failure frees them again.
"""

from __future__ import annotations

from edgekv.block_manager import BlockManager, BlockTable
from edgekv.kv_cache import PagedKVCache

from .spec import TierLayout


class Demoter:
    """``exact``: the newest tokens of each sequence also kept exact (kv_residual); blocks
    holding any of them stay in the newest tier, where decode reads around them."""

    def __init__(self, layout: TierLayout, manager: BlockManager, cache: PagedKVCache,
                 exact: int = 0):
        self.layout, self.manager, self.cache, self.exact = layout, manager, cache, exact
        self.last = len(layout.formats) - 1
        self.demoted = 0  # blocks moved because they aged
        self.early = 0  # blocks moved early, under memory pressure

    def _due(self, t: BlockTable, i: int) -> int:
        newest = min((i + 1) * self.manager.block_size, t.num_tokens) - 1
        return self.layout.due(t.num_tokens - 1 - newest)

    # ---- ageing ------------------------------------------------------------------------
    def age(self) -> int:
        """Move every block older than its tier to the tier it is due in; returns how many
        moved (fewer where the last tier is full: those stay until room is made)."""
        pool, due, where = self.manager.pool, {}, {}
        for t in self.manager.tables.values():
            for i in range(len(t.block_ids) - 1, -1, -1):  # newest first, stop at the oldest tier
                b = t.block_ids[i]
                if b is None:
                    continue
                d, cur = self._due(t, i), pool.tier_of(b)
                if cur < d:
                    due[b] = min(due.get(b, d), d)
                    where.setdefault(b, []).append((t, i))
                elif cur == d == self.last:
                    break
        shared = {b for b in due if pool.ref_counts[b] > len(where[b])}
        if shared:  # a holder may not have reached it: every holder decides
            seen = {(id(t), i) for b in shared for t, i in where[b]}
            for t in self.manager.tables.values():
                for i, b in enumerate(t.block_ids):
                    if b in shared and (id(t), i) not in seen:
                        due[b] = min(due[b], self._due(t, i))
                        where[b].append((t, i))
        moves = {b: d for b, d in due.items() if d > pool.tier_of(b)}
        n = self._move(moves, where)
        self.demoted += n
        return n

    # ---- pressure ----------------------------------------------------------------------
    def relieve(self, need: int, tier: int = 0) -> int:
        """Free up to ``need`` blocks of ``tier`` by moving its oldest movable blocks one
        tier down before they are due. Returns how many moved (0 if none can)."""
        if tier >= self.last or need <= 0:
            return 0
        pool, cands, where = self.manager.pool, [], {}
        for t in self.manager.tables.values():
            for i, b in enumerate(t.block_ids[:-1]):  # never the last (partial) block
                if b is None or pool.tier_of(b) != tier or pool.is_shared(b):
                    continue
                age = t.num_tokens - (i + 1) * self.manager.block_size
                if age < self.exact:
                    break
                cands.append((-age, b))
                where[b] = [(t, i)]
        cands.sort()
        moves = {b: tier + 1 for _, b in cands[:need]}
        n = self._move(moves, where)
        self.early += n
        return n

    # ---- one move ----------------------------------------------------------------------
    def _move(self, moves: dict[int, int], where: dict[int, list[tuple[BlockTable, int]]]
              ) -> int:
        """Move block b -> a new block of tier ``moves[b]`` for each b (oldest table entry
        first where a tier is short); ``where[b]``: every (table, index) holding b."""
        if not moves:
            return 0
        pool = self.manager.pool
        pairs = []
        for tier in sorted(set(moves.values())):
            blocks = [b for b, d in moves.items() if d == tier]
            short = len(blocks) - pool.num_free_in(tier)
            if short > 0:
                self.relieve(short, tier)
            blocks = blocks[: pool.num_free_in(tier)]
            pairs += zip(blocks, pool.allocate(len(blocks), tier), strict=True)
        try:
            self.cache.transcode(pairs)
        except BaseException:
            for _, new in pairs:
                pool.release(new)
            raise
        for old, new in pairs:  # commit: the holders, the hash, the references
            for t, i in where[old]:
                t.block_ids[i] = new
            for _ in range(len(where[old]) - 1):
                pool.share(new)
            h = pool.block_hash[old]
            for _ in where[old]:
                pool.release(old)
            if h is not None:
                pool.unregister(old)
                pool.register(new, h)
        return len(pairs)

    def stats(self) -> dict:
        return {"tier_demoted_blocks": self.demoted, "tier_early_blocks": self.early}
