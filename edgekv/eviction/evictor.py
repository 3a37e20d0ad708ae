"""The evictor: keeps each sequence's cached tokens inside its budget, block by block.

A sequence's block table, with the regions the evictor sees (block_size 4, budget 6
blocks, 1 sink block, window 6 tokens)::

    table:  [ b0 | b1 | b2 | b3 | b4 | b5 ]     23 cached tokens, the last block holds 3
             sink  ---candidates---  window      (blocks holding any of the last 6 tokens)

Before a sequence appends ``n`` tokens, ``fit`` caps ``n`` at what the budget can take
once every candidate is gone, then asks the policy for just enough candidates to drop.
Dropping a block removes its table entry and returns one reference to the pool (a block
shared with another sequence stays allocated for it). Tokens keep their positions: keys
were cached after RoPE, and the sequence's later tokens simply sit at smaller cache
indices (``position - seq.num_evicted``). Only full blocks are ever dropped, so every
entry but the last stays full and the table keeps its slot arithmetic.
"""

from __future__ import annotations

import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.engine.sequence import Sequence

from .base import POLICIES
from .config import EvictionBudget


class Evictor:
    """Owns the per-sequence block scores; mutates block tables only through ``fit`` and
    ``shrink``. ``mass_norm``: the mass one query spreads over a step (layers x query
    heads), by which observed mass is divided."""

    def __init__(self, budget: EvictionBudget, manager: BlockManager, mass_norm: float):
        assert manager.block_size == budget.block_size
        self.budget, self.manager, self.mass_norm = budget, manager, mass_norm
        self.policy = POLICIES[budget.policy](budget.obs_window)
        # seq_id -> (num_blocks,) fp32, on the device the mass comes from: a decode step
        # adds to it without a host sync; only an eviction reads it back
        self.scores: dict[int, torch.Tensor] = {}
        self.evicted_blocks = 0
        self.evicted_mass = 0.0
        self.observed_queries = 0

    @property
    def needs_mass(self) -> bool:
        return self.policy.needs_mass

    # ---- regions -----------------------------------------------------------------------
    def candidates(self, seq_id: int) -> list[int]:
        """Table indices that may be evicted now: past the sinks, before the window."""
        t = self.manager.tables.get(seq_id)
        if t is None or t.num_tokens == 0:
            return []
        bs, n = self.budget.block_size, t.num_tokens
        tail = (n - 1) // bs  # the last block is always kept: it is being written
        if self.budget.window_tokens:
            tail = min(tail, max(n - self.budget.window_tokens, 0) // bs)
        return list(range(self.budget.sink_blocks, tail))

    def room(self, seq: Sequence) -> int:
        """The most tokens ``seq`` can append at once, after evicting every candidate."""
        t = self.manager.tables.get(seq.seq_id)
        if t is None:
            return self.budget.tokens
        kept = t.num_tokens - len(self.candidates(seq.seq_id)) * self.budget.block_size
        return self.budget.tokens - kept

    # ---- changes -----------------------------------------------------------------------
    def fit(self, seq: Sequence, n: int) -> int:
        """Cap ``n`` new tokens at ``room(seq)``, evict what appending them needs, and
        return the capped ``n``. Afterwards ``append_slots(seq, n)`` stays in budget."""
        n = min(n, self.room(seq))
        assert n > 0, f"sequence {seq.seq_id}: no room in its eviction budget"
        t = self.manager.tables.get(seq.seq_id)
        if t is not None:
            over = t.num_tokens + n - self.budget.tokens
            if over > 0:
                self._evict(seq, -(-over // self.budget.block_size))
        return n

    def shrink(self, seq: Sequence) -> bool:
        """Evict one more block of ``seq`` (the pool is short); False if none may go."""
        if not self.candidates(seq.seq_id):
            return False
        self._evict(seq, 1)
        return True

    def observe(self, seqs: list[Sequence], num_new: list[int], mass: torch.Tensor) -> None:
        """Add one step's block mass (S, max_blocks), rows in ``seqs`` order, to the scores.
        A prefill chunk's mass comes from its last ``obs_window`` queries only."""
        mass = mass.float() / self.mass_norm
        for i, (seq, n) in enumerate(zip(seqs, num_new, strict=True)):
            nb = len(self.manager.block_ids(seq.seq_id))
            queries = 1 if n == 1 else min(n, self.budget.obs_window)
            scores = self._scores(seq.seq_id, nb).to(mass.device)
            self.scores[seq.seq_id] = self.policy.observe(scores, mass[i, :nb], queries)
            self.observed_queries += queries

    def forget(self, seq_id: int) -> None:
        """The sequence's blocks were freed (finished, preempted, reset)."""
        self.scores.pop(seq_id, None)

    def truncated(self, seq_id: int) -> None:
        """The sequence's table was cut back (a rewound chat): drop the scores of the
        blocks it no longer holds, so the blocks that take their places start at zero."""
        if seq_id in self.scores:
            nb = len(self.manager.block_ids(seq_id))
            self.scores[seq_id] = self.scores[seq_id][:nb]

    def stats(self) -> dict:
        b = self.budget
        return {
            "eviction": b.policy,
            "max_kv_tokens": b.tokens,
            "sink_tokens": b.sink_blocks * b.block_size,
            "window_tokens": b.window_tokens,
            "evicted_blocks": self.evicted_blocks,
            "evicted_tokens": self.evicted_blocks * b.block_size,
            "evicted_mass": self.evicted_mass if self.needs_mass else None,
            "observed_queries": self.observed_queries if self.needs_mass else None,
        }

    # ---- internals ---------------------------------------------------------------------
    def _scores(self, seq_id: int, num_blocks: int) -> torch.Tensor:
        s = self.scores.get(seq_id, torch.zeros(0))
        if len(s) < num_blocks:
            s = torch.cat([s, s.new_zeros(num_blocks - len(s))])
        return s[:num_blocks]

    def _evict(self, seq: Sequence, k: int) -> None:
        cands = self.candidates(seq.seq_id)
        assert k <= len(cands), f"sequence {seq.seq_id}: {k} blocks to evict, {len(cands)} may go"
        scores = self._scores(seq.seq_id, len(self.manager.block_ids(seq.seq_id)))
        victims = self.policy.choose(cands, scores, k)
        assert len(victims) == k and set(victims) <= set(cands), victims
        self.manager.evict(seq.seq_id, victims)
        keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        keep[victims] = False
        self.evicted_mass += float(scores[~keep].sum())
        self.scores[seq.seq_id] = scores[keep]
        self.evicted_blocks += k
        seq.num_evicted += k * self.budget.block_size
