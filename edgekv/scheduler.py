"""Scheduler: which sequences run this step, with how many new tokens, in which blocks.

Continuous batching: sequences join and leave between steps. Each step has a token budget
(``max_num_batched_tokens``). Running sequences go first, oldest first: a decoding one
takes 1 token, a prefilling one takes the next chunk of its prompt. Then waiting ones are
admitted, first come first served, while the budget and free blocks allow. When a running
sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it waits to be recomputed from its tokens. Nothing
runs out of memory; at worst a lone sequence that outgrows the whole pool is finished
with reason "length".

With an eviction policy (an ``Evictor``), a sequence never outgrows its own budget: its
chunks are capped at what the budget can take and blocks are evicted before each append;
when the pool runs short, a sequence first evicts its own blocks, and only then preempts.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .eviction import Evictor
from .sequence import Sequence, Status

log = logging.getLogger("edgekv")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens computed per sequence
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block pairs

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 evictor: Evictor | None = None):
        self.manager, self.evictor = manager, evictor
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # finished chat turns whose blocks are kept for the next turn, oldest first; they
        # are the first to give their blocks up when the pool runs short
        self.parked: dict[int, Sequence] = {}
        self.num_preemptions = 0

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
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
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
            n = self._chunk(seq, budget)
            if not self._room(seq, n):
                if not self.running and not batch:  # it cannot fit even alone
                    self.waiting.popleft()
                    self._finish_out_of_blocks(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(batch, seq, n)
            budget -= n
        return batch

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
        seq.num_computed = seq.num_evicted = 0

    # ---- internals ---------------------------------------------------------------------
    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq`` to compute this step; with eviction, capped at its KV budget
        (evicting what appending them needs)."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        return self.evictor.fit(seq, n) if self.evictor is not None else n

    def _room(self, seq: Sequence, n: int) -> bool:
        """Whether ``n`` more tokens of ``seq`` fit, after dropping parked caches, then
        evicting the sequence's own blocks, if needed."""
        while not self.manager.can_append(seq.seq_id, n):
            others = [s for s in self.parked.values() if s is not seq]
            if others:
                self.release(others[0])
            elif self.evictor is None or not self.evictor.shrink(seq):
                return False
        return True

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        _, copies = self.manager.append_slots(seq.seq_id, n)
        batch.seqs.append(seq)
        batch.num_new.append(n)
        batch.copies.extend(copies)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits to be recomputed from all its tokens."""
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish_out_of_blocks(self, seq: Sequence) -> None:
        log.warning("sequence %d needs more KV blocks than the whole pool holds (%d tokens); "
                    "finishing it early: raise kv_memory or use an eviction policy",
                    seq.seq_id, seq.num_tokens)
        self.finish(seq, "length")
