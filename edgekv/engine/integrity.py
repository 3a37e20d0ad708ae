"""What ``Engine.check_integrity()`` asserts: the engine's invariants between calls.

Beyond the block manager's own (free + used == total, ref counts == holders): every block
table belongs to a sequence the scheduler knows (running, waiting or parked) and holds
exactly its cached tokens (``seq.num_cached``), so nothing leaks and no table runs ahead;
no sequence is queued twice; every queued sequence belongs to a live request; eviction
scores and exact-window rings only exist for sequences with blocks.
"""

from __future__ import annotations

from edgekv.engine.sequence import Status


def check_engine(engine) -> None:
    """Assert the invariants above on ``engine`` (an ``Engine``); between steps only."""
    engine.manager.check_integrity()
    sch, tables = engine.scheduler, engine.manager.tables
    queued = [*sch.running, *sch.waiting]
    assert len({id(s) for s in queued}) == len(queued), "a sequence is queued twice"
    assert all(s.status is Status.RUNNING for s in sch.running), "running, not RUNNING"
    assert all(s.status is Status.WAITING for s in sch.waiting), "waiting, not WAITING"
    for sid, s in sch.parked.items():
        assert s.seq_id == sid and s.finished and s.keep_cache, f"parked sequence {sid}"
        assert all(s is not q for q in queued), f"sequence {sid} parked and queued"
    known = {s.seq_id: s for s in [*queued, *sch.parked.values()]}
    assert len(known) == len(queued) + len(sch.parked), "two sequences share an id"
    for sid in tables:
        assert sid in known, f"blocks of sequence {sid}, which no queue holds"
    for sid, s in known.items():
        cached = engine.manager.num_tokens(sid) if sid in tables else 0
        assert cached == s.num_cached, (
            f"sequence {sid}: table holds {cached} tokens, {s.num_cached} are cached")
    for s in queued:
        rid = engine.request_of.get(s.seq_id)
        assert rid is not None and any(x is s for x in engine.requests.get(rid, ())), (
            f"sequence {s.seq_id} belongs to no live request")
    if engine.evictor is not None:
        for sid, scores in engine.evictor.scores.items():
            assert sid in tables, f"eviction scores of sequence {sid}, which has no blocks"
            assert len(scores) <= len(tables[sid].block_ids), f"scores of {sid} too long"
    if engine.exact_window is not None:
        for sid in engine.exact_window.rings:
            assert sid in tables, f"exact-window ring of sequence {sid}, which has no blocks"
