"""Block pool and block tables: allocation order, sharing, copy-on-write, integrity."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgekv import BlockManager, BlockPool, NoFreeBlocks


def test_free_list_is_fifo_least_recently_freed_first():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    assert (a, b, c) == (0, 1, 2)
    pool.release(b)
    pool.release(a)
    assert pool.allocate(3) == [3, b, a]  # never-used block first, then in order freed
    pool.check_integrity()


def test_allocation_is_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_integrity()


def test_append_slots_maps_positions_to_flat_slots():
    m = BlockManager(num_blocks=8, block_size=4)
    slots, copies = m.append_slots(0, 6)
    assert copies == [] and m.block_ids(0) == [0, 1]
    assert slots == [0, 1, 2, 3, 4, 5]
    m.append_slots(1, 1)  # sequence 1 takes block 2
    slots, _ = m.append_slots(0, 3)  # fills block 1, then a new block 3
    assert slots == [6, 7, 12]
    assert m.block_ids(0) == [0, 1, 3] and m.num_tokens(0) == 9
    m.check_integrity()


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_last_block():
    m = BlockManager(num_blocks=8, block_size=4)
    m.append_slots(0, 6)  # blocks [0, 1], block 1 half full
    m.fork(0, 1)
    assert m.block_ids(1) == [0, 1] and m.pool.ref_counts[:2] == [2, 2]
    assert m.pool.num_used == 2
    slots, copies = m.append_slots(1, 1)  # child writes into the shared partial block
    assert copies == [(1, 2)] and m.block_ids(1) == [0, 2] and slots == [2 * 4 + 2]
    slots, copies = m.append_slots(0, 1)  # parent is now the only holder: writes in place
    assert copies == [] and slots == [1 * 4 + 2]
    assert m.pool.ref_counts[:3] == [2, 1, 1]
    m.check_integrity()
    m.free(0)
    m.free(1)
    assert m.pool.num_free == 8
    m.check_integrity()


def test_full_shared_last_block_needs_no_copy():
    m = BlockManager(num_blocks=4, block_size=4)
    m.append_slots(0, 4)
    m.fork(0, 1)
    assert m.blocks_needed(1, 1) == 1
    _, copies = m.append_slots(1, 1)
    assert copies == [] and m.block_ids(1)[0] == m.block_ids(0)[0]


def test_truncated_block_leaves_the_prefix_cache_when_rewritten_after_its_sharer_left():
    # a cached full block, truncated while shared, is written in place once the other
    # holder has gone: its hash must not keep naming the contents it had
    m = BlockManager(num_blocks=4, block_size=4)
    m.append_slots(0, 4)
    assert m.register(0, [b"h0"], 4) == 1
    m.fork(0, 1)
    m.truncate(0, 1)
    assert m.pool.lookup(b"h0") == m.block_ids(0)[0]  # still holds those bytes: a hit
    m.free(1)
    _, copies = m.append_slots(0, 1)  # sole holder now: writes in place
    assert copies == [] and m.pool.lookup(b"h0") is None
    m.check_integrity()


def test_freeing_a_table_keeps_its_cached_chain_root_longest():
    # blocks are released last first, so the free list reuses a chain's tail before its
    # root: after one allocation the prefix is still found from its first block
    m = BlockManager(num_blocks=3, block_size=4)
    m.append_slots(0, 12)
    assert m.register(0, [b"h0", b"h1", b"h2"], 12) == 3
    m.free(0)
    m.append_slots(1, 1)  # takes one free block
    assert m.match_prefix(2, [b"h0", b"h1", b"h2"], 3) == 2
    m.check_integrity()


def test_failed_append_changes_nothing():
    m = BlockManager(num_blocks=2, block_size=4)
    m.append_slots(0, 6)
    m.fork(0, 1)
    assert not m.can_append(1, 1)  # copy-on-write would need a third block
    with pytest.raises(NoFreeBlocks):
        m.append_slots(1, 1)
    with pytest.raises(NoFreeBlocks):
        m.append_slots(2, 1)
    assert 2 not in m.tables and m.num_tokens(1) == 6
    m.check_integrity()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / fork / write / evict / free sequences never break integrity or
    leak, and every sequence reads back exactly what it wrote and kept."""

    def __init__(self):
        super().__init__()
        self.m = BlockManager(num_blocks=24, block_size=4)
        self.next_id = 0
        self.writes = 0
        self.tokens: dict[int, list[int]] = {}  # what each sequence wrote, by position
        self.slot_owner: dict[int, tuple] = {}  # slot -> (seq, position) of its last write

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    @rule(n=st.integers(1, 20))
    def add(self, n):
        sid = self._new_id()
        if self.m.can_append(sid, n):
            self._write(sid, n)
        else:
            with pytest.raises(NoFreeBlocks):
                self.m.append_slots(sid, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append(self, data, n):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.m.can_append(sid, n):
            self._write(sid, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.m.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: any(len(t) > 4 for t in self.tokens.values()))
    @rule(data=st.data())
    def evict(self, data):
        """Drop some full blocks (never the last) from one table, as an eviction policy
        does; a block shared with another sequence stays for it."""
        sid = data.draw(st.sampled_from(sorted(s for s, t in self.tokens.items()
                                               if len(t) > 4)))
        nb = len(self.m.block_ids(sid))
        idx = data.draw(st.sets(st.integers(0, nb - 2), min_size=1))
        self.m.evict(sid, sorted(idx))
        bs = self.m.block_size
        self.tokens[sid] = [t for i, t in enumerate(self.tokens[sid]) if i // bs not in idx]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(sid)
        del self.tokens[sid]

    def _write(self, sid, n):
        """Simulate the bytes: copies move slot contents, writes stamp (seq, position)."""
        slots, copies = self.m.append_slots(sid, n)
        bs = self.m.block_size
        for src, dst in copies:
            for o in range(bs):
                if src * bs + o in self.slot_owner:
                    self.slot_owner[dst * bs + o] = self.slot_owner[src * bs + o]
        toks = self.tokens.setdefault(sid, [])
        for s in slots:  # a stamp no other write has, so stale slots cannot pass for it
            self.writes += 1
            self.slot_owner[s] = (sid, self.writes)
            toks.append((sid, self.writes))

    @invariant()
    def integrity(self):
        self.m.check_integrity()
        assert set(self.m.tables) == set(self.tokens)

    @invariant()
    def every_sequence_reads_back_what_it_wrote(self):
        for sid, toks in self.tokens.items():
            slots = self.m.slots(sid, 0, len(toks))
            assert [self.slot_owner[s] for s in slots] == toks

    def teardown(self):
        for sid in list(self.tokens):
            self.m.free(sid)
        self.m.check_integrity()
        assert self.m.pool.num_free == self.m.pool.num_blocks  # nothing leaked


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
