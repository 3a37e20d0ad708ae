"""Eviction policies and the evictor over block tables alone (no model): budgets, regions,
which blocks each policy drops, shared blocks, bad settings."""

import pytest
import torch

from edgekv.cache.block_manager import BlockManager
from edgekv.engine.sampling import SamplingParams
from edgekv.engine.sequence import Sequence
from edgekv.eviction import EVICTION_POLICIES, EvictionConfig, Evictor

BS = 4


def make(policy="streaming", budget=6 * BS, pool=32, **kw):
    mgr = BlockManager(pool, BS)
    cfg = EvictionConfig(policy, max_kv_tokens=budget, **kw)
    return mgr, Evictor(cfg.resolve(BS, pool), mgr, mass_norm=1.0)


def grow(mgr, ev, seq, n, chunk=1, cached=None):
    """Append ``n`` tokens ``chunk`` at a time through the evictor, like the scheduler.
    ``cached`` (a list of token positions, one per cache slot) is kept in step with the
    evictions, read off the block table."""
    done = 0
    while done < n:
        before = list(mgr.tables[seq.seq_id].block_ids) if seq.seq_id in mgr.tables else []
        k = ev.fit(seq, min(chunk, n - done))
        if cached is not None and before:
            after = mgr.block_ids(seq.seq_id)
            kept = [i for i, b in enumerate(before) if b in after]
            cached[:] = [p for i in kept for p in cached[i * BS : (i + 1) * BS]]
        mgr.append_slots(seq.seq_id, k)
        if cached is not None:
            cached.extend(range(seq.num_computed, seq.num_computed + k))
        seq.num_computed += k
        done += k
        assert len(mgr.block_ids(seq.seq_id)) <= ev.budget.blocks
        assert seq.num_cached == mgr.num_tokens(seq.seq_id)
        mgr.check_integrity()


def new_seq(i=0):
    return Sequence(i, [0], SamplingParams())


def test_registry_lists_the_policies():
    assert set(EVICTION_POLICIES) == {"streaming", "h2o", "snapkv"}


def test_defaults_derive_from_the_budget():
    b = EvictionConfig("h2o", max_kv_tokens=8 * BS).resolve(BS, 32)
    assert (b.blocks, b.sink_blocks, b.window_tokens) == (8, 1, 4 * BS)
    b = EvictionConfig("h2o", max_kv_tokens=3 * BS + 3).resolve(BS, 32)  # whole blocks
    assert (b.blocks, b.sink_blocks, b.window_tokens) == (3, 1, BS)
    b = EvictionConfig("streaming", max_kv_tokens=2 * BS).resolve(BS, 32)
    assert (b.blocks, b.sink_blocks, b.window_tokens) == (2, 0, 0)
    b = EvictionConfig("streaming").resolve(BS, 32)  # unset: the whole pool
    assert b.tokens == 32 * BS


@pytest.mark.parametrize("kw, match", [
    (dict(policy="lru"), "unknown eviction policy 'lru'; valid: .*streaming"),
    (dict(sink_tokens=3 * BS, window_tokens=3 * BS), "sinks .* window .* budget is 6 blocks"),
    (dict(window_tokens=6 * BS), "budget is 6 blocks"),
    (dict(max_kv_tokens=BS), "at least 2 blocks"),
    (dict(max_kv_tokens=33 * BS), "more than the KV pool holds"),
    (dict(max_kv_tokens=-1), "non-negative"),
])
def test_bad_settings_raise_clear_errors(kw, match):
    args = dict(policy="streaming", max_kv_tokens=6 * BS) | kw
    with pytest.raises(ValueError, match=match):
        EvictionConfig(**args).resolve(BS, 32)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_budget_sinks_and_window_hold_at_every_step(policy, chunk):
    """10x the budget through it: never over budget, the sink tokens and the newest
    ``window`` tokens are in the cache after every step."""
    mgr, ev = make(policy, sink_tokens=2, window_tokens=6)
    seq, cached = new_seq(), []
    torch.manual_seed(0)
    while seq.num_computed < 60 * BS:
        if ev.needs_mass and seq.num_computed:  # random attention: scores actually vary
            ev.observe([seq], [1], torch.rand(1, len(mgr.block_ids(0))))
        grow(mgr, ev, seq, chunk, chunk, cached)
        assert cached[:2] == [0, 1][: seq.num_computed]
        newest = list(range(seq.num_computed - 6, seq.num_computed))
        assert cached[-6:] == newest or seq.num_computed < 6
        assert len(cached) == seq.num_cached
    assert seq.num_evicted >= 50 * BS
    assert ev.stats()["evicted_tokens"] == seq.num_evicted


def test_fit_caps_a_chunk_at_what_the_budget_can_take():
    mgr, ev = make("streaming", budget=6 * BS, sink_tokens=BS, window_tokens=BS)
    seq = new_seq()
    assert ev.fit(seq, 1000) == 6 * BS  # a fresh sequence: the whole budget
    mgr.append_slots(0, 6 * BS)
    seq.num_computed = 6 * BS
    # sink block and window block stay: 4 blocks may go
    assert ev.room(seq) == 4 * BS
    assert ev.fit(seq, 1000) == 4 * BS
    assert mgr.block_ids(0) and seq.num_evicted == 4 * BS


def test_streaming_drops_the_oldest_middle_block():
    mgr, ev = make("streaming", budget=5 * BS, sink_tokens=BS, window_tokens=BS)
    seq = new_seq()
    grow(mgr, ev, seq, 5 * BS, chunk=5 * BS)
    ids = list(mgr.block_ids(0))
    grow(mgr, ev, seq, 1)
    assert mgr.block_ids(0)[:4] == [ids[0], ids[2], ids[3], ids[4]]


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_mass_policies_drop_the_least_attended_block(policy):
    mgr, ev = make(policy, budget=5 * BS, sink_tokens=BS, window_tokens=BS)
    seq = new_seq()
    grow(mgr, ev, seq, 5 * BS, chunk=5 * BS)
    ids = list(mgr.block_ids(0))
    ev.observe([seq], [1], torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    grow(mgr, ev, seq, 1)
    assert ids[2] not in mgr.block_ids(0) and ids[1] in mgr.block_ids(0)
    assert ev.stats()["evicted_mass"] == pytest.approx(0.05)


def test_h2o_accumulates_where_snapkv_forgets():
    """Old attention counts for h2o; snapkv follows what recent queries read."""
    kept = {}
    for policy in ("h2o", "snapkv"):
        mgr, ev = make(policy, budget=5 * BS, sink_tokens=BS, window_tokens=BS, obs_window=4)
        seq = new_seq()
        grow(mgr, ev, seq, 5 * BS, chunk=5 * BS)
        ids = list(mgr.block_ids(0))
        for _ in range(20):  # long ago, block 1 was read a lot
            ev.observe([seq], [1], torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))
        for _ in range(10):  # lately, block 2
            ev.observe([seq], [1], torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]))
        ev.observe([seq], [1], torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0]]))
        grow(mgr, ev, seq, 1)
        kept[policy] = (ids[1] in mgr.block_ids(0), ids[2] in mgr.block_ids(0))
    assert kept["h2o"] == (True, True)  # block 3 (least total) went
    assert kept["snapkv"] == (False, True)  # block 1, no longer read, went


def test_evicting_a_shared_block_only_drops_this_sequences_reference():
    mgr, ev = make("streaming", budget=5 * BS, sink_tokens=BS, window_tokens=BS)
    parent = new_seq(0)
    grow(mgr, ev, parent, 5 * BS, chunk=5 * BS)
    mgr.fork(0, 1)
    child = new_seq(1)
    child.num_computed = parent.num_computed
    shared = mgr.block_ids(0)[1]
    grow(mgr, ev, child, 1)
    assert shared not in mgr.block_ids(1) and shared in mgr.block_ids(0)
    assert mgr.pool.ref_counts[shared] == 1
    mgr.free(1)
    mgr.free(0)
    mgr.check_integrity()
    assert mgr.pool.num_free == 32


def test_shrink_gives_up_only_evictable_blocks():
    mgr, ev = make("streaming", budget=6 * BS, sink_tokens=BS, window_tokens=BS)
    seq = new_seq()
    grow(mgr, ev, seq, 4 * BS, chunk=4 * BS)
    assert ev.shrink(seq) and ev.shrink(seq)
    assert not ev.shrink(seq)  # sink + window left
    assert len(mgr.block_ids(0)) == 2 and seq.num_evicted == 2 * BS


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_a_rewound_table_drops_the_scores_of_its_cut_blocks(policy):
    mgr, ev = make(policy, budget=8 * BS)
    seq = Sequence(0, [0], SamplingParams())
    mgr.append_slots(0, 6 * BS)
    seq.num_computed = 6 * BS
    ev.observe([seq], [1], torch.tensor([[0, 0, 0, 0, 9.0, 9.0]]))  # blocks 4, 5 read
    mgr.truncate(0, 3 * BS)  # a chat rewinds to 3 blocks
    ev.truncated(0)
    mgr.append_slots(0, 3 * BS)  # new blocks take indices 3..5
    ev.observe([seq], [1], torch.zeros(1, 6))
    assert ev.scores[0][3:].tolist() == [0.0, 0.0, 0.0]
