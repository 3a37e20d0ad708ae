"""Scheduler: which sequences run this step, with how many new tokens, in which blocks.

Continuous batching: sequences join and leave between steps. Each step has a token budget
(``max_num_batched_tokens``). Running sequences go first, oldest first: a decoding one
takes 1 token, a prefilling one takes the next chunk of its prompt. Then waiting ones are
admitted, first come first served, while the budget and free blocks allow. When a running
sequence needs a block and none is free, the most recently admitted sequence is
preempted: with a host pool (offload) its unshared blocks are swapped out and come back
when it is admitted again; otherwise its blocks are freed and it waits to be recomputed
from its tokens. Parked chat caches (the least recently scheduled sequences) give their
blocks up first, to the host pool when there is room. Nothing runs out of memory; at worst
a lone sequence that outgrows the whole pool is finished with reason "context" (the pool
is then its context; a prompt that cannot fit at all is refused by ``Engine.add``).

Prefix caching: a sequence admitted with no blocks starts from the cached blocks of its
longest matching prefix (``BlockManager.match_prefix``), and its full blocks join the cache
once computed (``computed``). A request whose next uncached block is being computed by a
running sequence waits a step or more for it rather than compute the same block twice.

With an eviction policy (an ``Evictor``), a sequence never outgrows its own budget: its
chunks are capped at what the budget can take and blocks are evicted before each append;
when the pool runs short, a sequence first evicts its own blocks, and only then preempts.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgekv.cache.block_manager import BlockManager
from edgekv.cache.context_shift import ContextShift
from edgekv.cache.offload import Offloader
from edgekv.cache.prefix_cache import sequence_hashes
from edgekv.engine.sequence import Sequence, Status
from edgekv.eviction import Evictor

log = logging.getLogger("edgekv")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens computed per sequence

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """``copy_blocks`` performs copy-on-write pairs in the KV storage. It is called as soon
    as a sequence's slots are reserved, not when the batch runs: later in the same
    ``schedule`` a parked cache may be released and its blocks reused by a swap-in, which
    writes bytes at once, so a pending copy's source would already be overwritten."""

    def __init__(self, manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 copy_blocks: Callable[[list[tuple[int, int]]], None],
                 evictor: Evictor | None = None, offloader: Offloader | None = None,
                 prefix_salt: bytes | None = None,
                 forget: Callable[[int], None] | None = None,
                 shifter: ContextShift | None = None, demoter=None):
        self.manager, self.evictor, self.offloader = manager, evictor, offloader
        self.demoter = demoter  # age tiers: moves old blocks out of the newest tier early
        self.copy_blocks = copy_blocks
        self.forget = forget  # told when a sequence's blocks are freed (exact-window rings)
        self.shifter = shifter  # with eviction: keeps rotary positions inside the context
        self.prefix_salt = prefix_salt  # None: prefix caching off
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # finished chat turns whose blocks are kept for the next turn, oldest first; they
        # are the first to give their blocks up when the pool runs short
        self.parked: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found there (not computed again)

    def add(self, seq: Sequence) -> None:
        self.parked.pop(seq.seq_id, None)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.num_computed == seq.num_tokens:
                continue  # preempted earlier in this loop, or waits for its beam group
            n = self._chunk(seq, budget)
            while not self._room(seq, n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    self._finish_out_of_blocks(seq)
                    break
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self._take(batch, seq, n)
            budget -= n
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            ready = self._resume(seq, budget)
            if ready is None:  # waits for blocks another sequence is computing
                break
            todo = ready and seq.num_computed < seq.num_tokens  # else a beam that waits
            n = self._chunk(seq, budget) if todo else 0
            if not ready or not self._room(seq, n):
                if not self.running and not batch:  # it cannot fit even alone
                    self.waiting.popleft()
                    self._finish_out_of_blocks(seq)
                    continue
                self._unmatch(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if todo:
                self._take(batch, seq, n)
                budget -= n
        return batch

    def computed(self, seq: Sequence) -> None:
        """``seq.num_computed`` advanced and its K/V are written: offer its new full blocks
        to the prefix cache (never past an evicted block)."""
        if self.prefix_salt is None or seq.num_evicted:
            return
        bs = self.manager.block_size
        hashes = sequence_hashes(seq, seq.num_computed, bs, self.prefix_salt)
        self.manager.register(seq.seq_id, hashes, seq.num_computed)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and release its blocks (a chat session parks them instead)."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.keep_cache:
            self.parked[seq.seq_id] = seq
        else:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free a sequence's blocks; its tokens stay, to be recomputed if it runs again."""
        self.parked.pop(seq.seq_id, None)
        if seq.seq_id in self.manager.tables:
            self.manager.free(seq.seq_id)
        if self.evictor is not None:
            self.evictor.forget(seq.seq_id)
        if self.forget is not None:
            self.forget(seq.seq_id)
        seq.num_computed = seq.num_evicted = 0

    # ---- internals ---------------------------------------------------------------------
    def _resume(self, seq: Sequence, budget: int) -> bool | None:
        """Before admitting ``seq``: bring its swapped blocks back, or start it from the
        prefix cache. False: no room to swap in; None: wait for a running sequence to
        compute the block it would hit next."""
        mgr = self.manager
        if mgr.is_swapped(seq.seq_id):
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self.evictor is not None:  # its chunk is capped (and made room for by
                n = min(n, 1)  # evicting) once it is back: swapped blocks + one slot
            if not self._room(seq, n, shrink=False):
                return False
            self.offloader.swap_in(seq.seq_id)
            return True
        if self.prefix_salt is None or seq.seq_id in mgr.tables or seq.num_computed:
            return True
        bs = mgr.block_size
        limit = seq.num_tokens - 1  # the last token is always computed: it gives the logits
        if self.evictor is not None:
            limit = min(limit, self.evictor.budget.tokens - 1)
        max_blocks = max(limit, 0) // bs
        hashes = sequence_hashes(seq, max_blocks * bs, bs, self.prefix_salt)[:max_blocks]
        hit = mgr.match_prefix(seq.seq_id, hashes, max_blocks)
        if hit < max_blocks and hashes[hit] in self._pending_hashes():
            mgr.free(seq.seq_id)
            return None
        seq.num_computed = seq.num_prefix_hit = hit * bs
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += hit * bs
        return True

    def _unmatch(self, seq: Sequence) -> None:
        """Undo a prefix match of a sequence that is not admitted after all (its cached
        blocks go back to the free list, still cached)."""
        if (self.prefix_salt is not None and seq.seq_id in self.manager.tables
                and not seq.keep_cache and seq.num_computed == self.manager.num_tokens(
                    seq.seq_id) and not self.manager.is_swapped(seq.seq_id)
                and seq.num_evicted == 0):
            self.prefix_query_tokens -= seq.num_tokens
            self.prefix_hit_tokens -= seq.num_computed
            self.manager.free(seq.seq_id)
            seq.num_computed = seq.num_prefix_hit = 0

    def _pending_hashes(self) -> set[bytes]:
        """Hashes of full blocks that running sequences will compute but have not yet."""
        bs, pending = self.manager.block_size, set()
        for s in self.running:
            if s.num_evicted:
                continue
            hashes = sequence_hashes(s, s.num_tokens, bs, self.prefix_salt)
            pending.update(hashes[s.num_computed // bs :])
        return pending

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq`` to compute this step; with eviction, capped at its KV budget
        (evicting what appending them needs)."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        return self.evictor.fit(seq, n) if self.evictor is not None else n

    def _room(self, seq: Sequence, n: int, shrink: bool = True) -> bool:
        """Whether ``n`` more tokens of ``seq`` fit, after moving parked caches out (to the
        host pool if it has room, else dropping them), then evicting the sequence's own
        blocks (if ``shrink``), if needed."""
        while not self._fits(seq, n):
            short = self.manager.blocks_needed(seq.seq_id, n) - self.manager.pool.num_free
            if self.demoter is not None and self.demoter.relieve(short):
                continue  # the newest tier made room by demoting its oldest blocks early
            others = [s for s in self.parked.values()
                      if s is not seq and self.manager.num_swappable(s.seq_id) > 0]
            if others:
                if self.offloader is not None and self.manager.can_swap_out(others[0].seq_id):
                    self.offloader.swap_out(others[0].seq_id)
                else:
                    self.release(others[0])
            elif not shrink or self.evictor is None or not self.evictor.shrink(seq):
                return False
        return True

    def _fits(self, seq: Sequence, n: int) -> bool:
        """Whether the pool has the blocks ``n`` more tokens of ``seq`` take, those of a
        context shift before them included."""
        extra = self.shifter.blocks_needed(seq.seq_id, n) if self.shifter else 0
        return self.manager.blocks_needed(seq.seq_id, n) + extra <= self.manager.pool.num_free

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        """Reserve ``n`` slots of ``seq`` and copy its copy-on-write blocks; if the copy
        raises, the reservation is undone (the table keeps its shared block)."""
        t = self.manager.tables.get(seq.seq_id)
        before = t.num_tokens if t is not None else None
        if self.shifter is not None:
            self.shifter.fit(seq.seq_id, n)
        _, copies = self.manager.append_slots(seq.seq_id, n)
        try:
            self.copy_blocks(copies)  # now: see the class docstring
        except BaseException:
            self._unreserve(seq.seq_id, before, copies)
            raise
        batch.seqs.append(seq)
        batch.num_new.append(n)

    def _unreserve(self, seq_id: int, num_tokens: int | None,
                   copies: list[tuple[int, int]]) -> None:
        """Undo ``append_slots`` whose copies were not made: each uncopied private block
        gives its entry back to the shared block it replaced, then the table is cut back to
        its ``num_tokens`` (None: it had no table)."""
        mgr = self.manager
        if num_tokens is None:
            mgr.free(seq_id)
            return
        ids = mgr.block_ids(seq_id)
        for old, new in copies:  # held by the sequence it was shared with, or free
            mgr.pool.take(old)
            ids[ids.index(new)] = old
            mgr.pool.release(new)
        mgr.truncate(seq_id, num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Swap the sequence's blocks out if the host pool has room; else free them, and it
        waits to be recomputed from all its tokens. If the swap raises, it stays running."""
        if self.offloader is not None and self.manager.can_swap_out(seq.seq_id):
            self.offloader.swap_out(seq.seq_id)
        else:
            self.release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish_out_of_blocks(self, seq: Sequence) -> None:
        log.warning("sequence %d needs more KV blocks than the whole pool holds (%d tokens); "
                    "finishing it early: raise kv_memory or use an eviction policy",
                    seq.seq_id, seq.num_tokens)
        self.finish(seq, "context")
