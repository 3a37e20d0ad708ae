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

from edgekv.cache.block_manager import BlockManager, BlockTable
from edgekv.cache.kv_cache import PagedKVCache

from .spec import TierLayout


class Demoter:
    """``exact``: the newest tokens of each sequence also kept exact (exact_window); blocks
    holding any of them stay in the newest tier, where decode reads around them."""

    def __init__(self, layout: TierLayout, manager: BlockManager, cache: PagedKVCache,
                 exact: int = 0):
        self.layout, self.manager, self.cache, self.exact = layout, manager, cache, exact
        self.last = len(layout.formats) - 1
        self.demoted = 0  # blocks moved because they aged
        self.early = 0  # blocks moved early, under memory pressure
        # per sequence: (its table, the leading entries known to sit in the last tier, the
        # table's cuts then). Appends add newest-tier entries at the end and nothing moves
        # a block back up but a copy of the last entry, so only a truncation (a new cut)
        # or a new table makes the mark stale
        self._settled: dict[int, tuple[BlockTable, int, int]] = {}
        # per sequence: tokens written when ``age`` last ran; a step's reservations past
        # them are not written yet, and ``relieve`` must not move them
        self._written: dict[int, int] = {}

    def _age_of(self, t: BlockTable, i: int) -> int:
        """Tokens after the newest token of entry ``i``."""
        return t.num_tokens - min((i + 1) * self.manager.block_size, t.num_tokens)

    # ---- ageing ------------------------------------------------------------------------
    def age(self) -> int:
        """After a step (every table's tokens written): move every block older than its
        tier to the tier it is due in; returns how many moved (fewer where the last tier
        is full: those stay, and move when room is made)."""
        pool, due, where = self.manager.pool, {}, {}
        tables = self.manager.tables
        for sid, t in tables.items():
            start = min(self._mark(sid, t), max(len(t.block_ids) - 1, 0))
            for i in range(start, len(t.block_ids)):
                b = t.block_ids[i]
                if b is None or pool.tier_of(b) == self.last:
                    continue
                d = self.layout.due(self._age_of(t, i))
                due[b] = min(due.get(b, d), d)  # the youngest holder decides
                where.setdefault(b, []).append((t, i))
        # every holder of a block not in the last tier lies past its table's mark, so
        # ``where`` lists them all; a block some holder did not list stays put
        moves = {b: d for b, d in due.items()
                 if d > pool.tier_of(b) and pool.ref_counts[b] == len(where[b])}
        n = self._move(moves, where)
        self.demoted += n
        self._settled = {sid: (t, self._settle(t, self._mark(sid, t)), t.cuts)
                         for sid, t in tables.items()}
        self._written = {sid: t.num_tokens for sid, t in tables.items()}
        return n

    def _mark(self, sid: int, t: BlockTable) -> int:
        table, mark, cuts = self._settled.get(sid, (None, 0, 0))
        return mark if table is t and cuts == t.cuts else 0

    def _settle(self, t: BlockTable, mark: int) -> int:
        pool, ids = self.manager.pool, t.block_ids
        mark = min(mark, max(len(ids) - 1, 0))
        while mark < len(ids) - 1 and ids[mark] is not None and \
                pool.tier_of(ids[mark]) == self.last:
            mark += 1
        return mark

    # ---- pressure ----------------------------------------------------------------------
    def relieve(self, need: int, tier: int = 0, keep: frozenset[int] = frozenset()) -> int:
        """Free up to ``need`` blocks of ``tier`` by moving its oldest movable blocks one
        tier down before they are due: full blocks written by an earlier step, unshared,
        outside the exact window, not in ``keep``. Returns how many moved (0: none can)."""
        if tier >= self.last or need <= 0:
            return 0
        pool, bs, cands, where = self.manager.pool, self.manager.block_size, [], {}
        for sid, t in self.manager.tables.items():
            written = min(self._written.get(sid, 0), t.num_tokens)
            for i, b in enumerate(t.block_ids):
                if (i + 1) * bs > written or t.num_tokens - (i + 1) * bs < self.exact:
                    break  # not written yet, or holding exact-window tokens
                if b is None or b in keep or pool.tier_of(b) != tier or pool.is_shared(b):
                    continue
                cands.append((-self._age_of(t, i), b))
                where[b] = [(t, i)]
        cands.sort()
        n = self._move({b: tier + 1 for _, b in cands[:need]}, where)
        self.early += n
        return n

    # ---- one move ----------------------------------------------------------------------
    def _move(self, moves: dict[int, int], where: dict[int, list[tuple[BlockTable, int]]]
              ) -> int:
        """Move block b -> a new block of tier ``moves[b]`` for each b; ``where[b]``: every
        (table, index) holding b. Deepest destination first; where a tier is short it
        makes room (moving other blocks further down), then its oldest blocks go first."""
        if not moves:
            return 0
        pool, pairs = self.manager.pool, []
        keep = frozenset(moves)
        try:
            for tier in sorted(set(moves.values()), reverse=True):
                blocks = sorted((b for b, d in moves.items() if d == tier),
                                key=lambda b: -self._age_of(*where[b][0]))
                short = len(blocks) - pool.num_free_in(tier)
                if short > 0:
                    self.relieve(short, tier, keep)
                blocks = blocks[: pool.num_free_in(tier)]
                pairs += zip(blocks, pool.allocate(len(blocks), tier), strict=True)
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
