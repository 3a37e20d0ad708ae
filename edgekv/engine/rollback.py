"""Taking back a step that raised, so that the engine is as if it had not run.

A step reserves slots (``Scheduler.schedule``), runs the model, samples, then commits each
sequence's token (``Engine._postprocess``). Whatever raises in between, ``roll_back``
leaves every sequence in a state from which it continues exactly as if the step had not
happened:

::

    computed, not sampled:   num_computed back to before the step (its chunk runs again),
                             random state and eviction scores as they were; n > 1 samples
                             it forked this step are dropped (forked again)
    sampled and committed:   kept (it simply finished its step)
    every block table:       cut back to ``seq.num_cached`` (slots reserved for nothing)
    exact-window rings:      cut back to the cache

What schedule itself committed (evictions, preemptions, swaps, prefix hits) stays: each is
a consistent state on its own, and moves bytes before the tables that point at them.
"""

from __future__ import annotations

from edgekv.engine.sequence import Sequence, Status


class StepUndo:
    """Per step: ``begin``, ``save`` the sequences before they change, then ``end`` or
    ``roll_back``. ``engine``: the Engine whose scheduler, manager, evictor and exact window it
    mends."""

    def __init__(self, engine):
        self.engine = engine
        # seq -> (num_computed, eviction scores, generator state) before this step
        self.saved: dict[Sequence, tuple] = {}
        self.first_new_id = 0  # sequences with this id or later were forked in this step

    def begin(self) -> None:
        self.saved, self.first_new_id = {}, self.engine._next_id

    def end(self) -> None:
        self.saved = {}

    def save(self, seqs: list[Sequence]) -> None:
        """Remember what a rollback restores: computed count and eviction scores (first
        save of the step), and the random state of sequences about to sample."""
        evictor = self.engine.evictor
        for seq in seqs:
            num_computed, scores, state = self.saved.get(seq, (seq.num_computed, None, None))
            if seq not in self.saved and evictor is not None:
                scores = evictor.scores.get(seq.seq_id)  # replaced, never changed in place
            if state is None and seq.generator is not None and not seq.params.greedy:
                state = seq.generator.get_state()
            self.saved[seq] = (num_computed, scores, state)

    def roll_back(self) -> None:
        """After the step raised: see the module docstring."""
        eng = self.engine
        sch, mgr, evictor, window = eng.scheduler, eng.manager, eng.evictor, eng.exact_window
        for seq in list(sch.running):
            if seq.samples and unsampled(seq) and all(
                    c.seq_id >= self.first_new_id for c in seq.samples[1:]):
                for child in seq.samples[1:]:
                    sch.running.remove(child)
                    sch.release(child)
                    child.status = Status.FINISHED
                seq.samples = None
        for seq in [*sch.running, *sch.waiting, *sch.parked.values()]:
            saved = self.saved.get(seq)
            if seq.status is Status.RUNNING and unsampled(seq):
                done = saved[0] if saved is not None else seq.num_computed
                seq.num_computed = done if done < seq.num_computed else seq.num_computed - 1
                if saved is not None and saved[2] is not None:
                    seq.generator.set_state(saved[2])
            sid = seq.seq_id
            if evictor is not None and saved is not None and seq.num_computed == saved[0]:
                if saved[1] is None:  # nothing of the step is kept
                    evictor.scores.pop(sid, None)
                else:
                    evictor.scores[sid] = saved[1]
            if sid in mgr.tables and mgr.num_tokens(sid) > seq.num_cached:
                mgr.truncate(sid, seq.num_cached)
            if evictor is not None and sid in mgr.tables:
                evictor.truncated(sid)
            ring = window.rings.get(sid) if window is not None else None
            if ring is not None:
                ring.end = min(ring.end, seq.num_cached)
                ring.start = min(ring.start, ring.end)


def unsampled(seq: Sequence) -> bool:
    """Its known tokens are all computed, yet it has neither sampled its next token nor
    handed its logits to its beam search (which would then drive it)."""
    if seq.num_computed < seq.num_tokens:
        return False
    b = seq.beam
    return b is None or (not b.finished and seq.seq_id not in b.pending)


__all__ = ["StepUndo", "unsampled"]
