"""Random share / prefix-hit / fork / copy-on-write / truncate / swap / free sequences keep
the pools' integrity, leak nothing, and every sequence (and every cached block) reads back
exactly its tokens."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgekv import BlockManager
from edgekv.cache.prefix_cache import extend_hashes

BS, SALT = 4, b"test"
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=20)  # few values: many hits


class SharingMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = BlockManager(num_blocks=16, block_size=BS, num_host_blocks=10)
        self.dev: dict[int, int] = {}  # device slot -> token written there
        self.host: dict[int, int] = {}  # host slot -> token
        self.tokens: dict[int, list[int]] = {}  # each sequence's tokens, all in its blocks
        self.prefix_of: dict[bytes, list[int]] = {}  # hash -> the tokens it names
        self.next_id = 0
        self.hits = 0

    # ---- rules -------------------------------------------------------------------------
    @rule(toks=TOKENS)
    def add(self, toks):
        sid = self.next_id = self.next_id + 1
        hashes = self._hashes(toks)
        hit = self.m.match_prefix(sid, hashes, (len(toks) - 1) // BS)
        self.hits += hit
        rest = len(toks) - hit * BS
        if not self.m.can_append(sid, rest):
            self.m.free(sid)
            return
        self.tokens[sid] = toks[: hit * BS]
        self._write(sid, toks[hit * BS :])

    @precondition(lambda self: self._resident())
    @rule(data=st.data(), toks=TOKENS)
    def append(self, data, toks):
        sid = data.draw(st.sampled_from(self._resident()))
        if self.m.can_append(sid, len(toks)):
            self._write(sid, toks)

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._resident()))
        child = self.next_id = self.next_id + 1
        self.m.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        keep = data.draw(st.integers(0, len(self.tokens[sid])))
        self.m.truncate(sid, keep)
        del self.tokens[sid][keep:]

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def swap_out(self, data):
        sid = data.draw(st.sampled_from(self._resident()))
        if self.m.can_swap_out(sid):
            for d, h in self.m.swap_out(sid):
                for o in range(BS):
                    if d * BS + o in self.dev:
                        self.host[h * BS + o] = self.dev[d * BS + o]

    @precondition(lambda self: any(self.m.is_swapped(s) for s in self.tokens))
    @rule(data=st.data())
    def swap_in(self, data):
        sid = data.draw(st.sampled_from([s for s in sorted(self.tokens)
                                         if self.m.is_swapped(s)]))
        if len(self.m.tables[sid].host) <= self.m.pool.num_free:
            for h, d in self.m.swap_in(sid):
                for o in range(BS):
                    if h * BS + o in self.host:
                        self.dev[d * BS + o] = self.host[h * BS + o]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(sid)
        del self.tokens[sid]

    # ---- invariants --------------------------------------------------------------------
    @invariant()
    def integrity(self):
        self.m.check_integrity()
        assert set(self.m.tables) == set(self.tokens)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        for sid, toks in self.tokens.items():
            t = self.m.tables[sid]
            got = []
            for p in range(len(toks)):
                i, o = divmod(p, BS)
                b = t.block_ids[i]
                got.append(self.host[t.host[i] * BS + o] if b is None else self.dev[b * BS + o])
            assert got == toks, sid

    @invariant()
    def every_cached_block_holds_what_its_hash_names(self):
        for h, b in self.m.pool.cached.items():
            want = self.prefix_of[h][-BS:]
            assert [self.dev.get(b * BS + o) for o in range(BS)] == want

    def teardown(self):
        for sid in list(self.tokens):
            self.m.free(sid)
        self.m.check_integrity()
        assert self.m.pool.num_free == self.m.pool.num_blocks  # nothing leaked
        assert self.m.host_pool.num_free == self.m.host_pool.num_blocks

    # ---- helpers -----------------------------------------------------------------------
    def _resident(self):
        return [s for s in sorted(self.tokens) if not self.m.is_swapped(s)]

    def _hashes(self, toks):
        hashes = extend_hashes([], toks, len(toks), BS, SALT)
        for i, h in enumerate(hashes):
            self.prefix_of.setdefault(h, toks[: (i + 1) * BS])
        return hashes

    def _write(self, sid, new):
        slots, copies = self.m.append_slots(sid, len(new))
        for src, dst in copies:
            for o in range(BS):
                if src * BS + o in self.dev:
                    self.dev[dst * BS + o] = self.dev[src * BS + o]
        for s, tok in zip(slots, new, strict=True):
            self.dev[s] = tok
        self.tokens[sid].extend(new)
        toks = self.tokens[sid]
        self.m.register(sid, self._hashes(toks), len(toks))


TestSharingMachine = SharingMachine.TestCase
TestSharingMachine.settings = settings(max_examples=200, stateful_step_count=40,
                                       deadline=None)
