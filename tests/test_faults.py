"""Whatever is raised wherever in a call (a bad prompt, an error, Ctrl-C), the engine stays
consistent: check_integrity() holds, no block leaks, the next generate equals a fresh LLM's,
and the other live requests (a stream, a parked chat) carry on exactly as they would have."""

import gc
import os
import signal
import threading

import pytest
import torch

import edgekv.cache.offload
import edgekv.engine.engine
from edgekv import LLM, SamplingParams
from edgekv.engine import outputs
from edgekv.engine.detokenizer import IncrementalDetokenizer
from edgekv.engine.guard import BUSY
from edgekv.engine.sequence import Status

from tiny_models import build_tiny_model

BLOCK = 2 * 2 * 2 * 16 * (32 + 2)  # int8 block: K+V, layers, kv heads, tokens, codes + scale
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CHAT = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROBES = ["Once upon a time there was a small cache", "The quick brown fox jumps"]
BACKGROUND = "Hello! How are you today?"
HEADER = "Once upon a time there was a small cache that held many keys and values. "

# name -> (LLM kwargs, the faulted generate's prompts and params)
CONFIGS = {
    # prefix hits and n > 1 forks: copy-on-write copies of shared partial blocks
    "prefix": (dict(kv_memory=64 * BLOCK),
               ([HEADER + "The quick", HEADER + "Hello!"],
                SamplingParams(n=2, max_tokens=8, temperature=0.8, seed=3, ignore_eos=True))),
    # a pool that holds about two of these at once: preemption by swapping to the host
    "offload": (dict(kv_memory=12 * BLOCK, offload_memory=64 * BLOCK),
                ([HEADER + "The quick brown", HEADER * 2 + "Ünïcödé", "Hello! " * 12],
                 SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))),
    # each sequence's newest tokens also kept exact in rings, forks copying them
    "exact_window": (dict(kv_memory=64 * BLOCK, exact_window=8),
                 ([HEADER + "The quick", "Hello! How are you today?"],
                  SamplingParams(n=3, max_tokens=8, temperature=0.8, seed=5,
                                 ignore_eos=True))),
    # beams under a 48-token eviction budget (no prefix cache: hits would change the mass)
    "evict": (dict(kv_memory=64 * BLOCK, eviction="h2o", max_kv_tokens=48,
                   prefix_caching=False),
              ([HEADER * 2 + "The quick", "Hello! How are you today? I am fine, thank you."],
               SamplingParams(beam_width=2, max_tokens=24))),
    # a 64-token model context under a 32-token budget, with offload and n > 1 forks: the
    # cache shifts its positions (context_shift.py) every few steps
    "shift": (dict(kv_memory=24 * BLOCK, offload_memory=64 * BLOCK, eviction="streaming",
                   max_kv_tokens=32, block_size=8, context=64),
              ([HEADER + "The quick", "Hello! How are you today? I am fine."],
               SamplingParams(n=2, max_tokens=40, temperature=0.8, seed=7,
                              ignore_eos=True))),
}


def build(llama_dir, name):
    kw = dict(CONFIGS[name][0])
    context = kw.pop("context", None)
    if context is not None:  # the same tiny Llama with a shorter context
        path = llama_dir.parent / f"llama-context-{context}"
        if not path.is_dir():
            build_tiny_model(path, "llama", max_position_embeddings=context)
        llama_dir = path
    return LLM(llama_dir, kv_format="int8", dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def setups(llama_dir):
    """Per configuration: the LLM under test and a fresh one with its cached outputs."""
    made = {}

    def get(name):
        if name not in made:
            ref = build(llama_dir, name)
            want = {"probes": [o.token_ids for o in ref.generate(PROBES, GREEDY)],
                    "background": ref.generate(BACKGROUND, GREEDY)[0].text,
                    "workload": completions(ref.generate(*CONFIGS[name][1]))}
            made[name] = build(llama_dir, name), ref, want
        return made[name]

    return get


def completions(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


class Fault:
    """Raise ``exc`` on the ``k``-th call of what ``wrap`` wraps (after it, with ``after``);
    with ``counts``, only the calls for which ``counts(*args)`` is true count."""

    def __init__(self, exc: type[BaseException], k: int, after: bool = False, counts=None):
        self.exc, self.k, self.after, self.calls, self.fired = exc, k, after, 0, False
        self.counts = counts

    def wrap(self, fn):
        def faulty(*args, **kwargs):
            if self.counts is not None and not self.counts(*args):
                return fn(*args, **kwargs)
            self.calls += 1
            fire = self.calls == self.k
            if fire and not self.after:
                self.fired = True
                raise self.exc("injected fault")
            out = fn(*args, **kwargs)
            if fire:
                self.fired = True
                raise self.exc("injected fault")
            return out

        return faulty


def inject(monkeypatch, llm, stage, fault):
    eng = llm.engine
    if stage == "schedule":
        monkeypatch.setattr(eng.scheduler, "schedule", fault.wrap(eng.scheduler.schedule))
    elif stage == "copy_blocks":  # copy-on-write copies (made as the slots are reserved)
        monkeypatch.setattr(eng.cache, "copy_blocks", fault.wrap(eng.cache.copy_blocks))
    elif stage in ("swap_out", "swap_in"):
        monkeypatch.setattr(eng.offloader, stage, fault.wrap(getattr(eng.offloader, stage)))
    elif stage == "swap_copy":  # inside a swap: its table entries are already moved
        monkeypatch.setattr(edgekv.cache.offload, "copy_blocks_between",
                            fault.wrap(edgekv.cache.offload.copy_blocks_between))
    elif stage in ("run", "run_after"):  # run_after: the K/V are written, mass observed
        fault.after = stage == "run_after"
        monkeypatch.setattr(eng.runner, "run", fault.wrap(eng.runner.run))
    elif stage == "sample":
        monkeypatch.setattr(edgekv.engine.engine, "sample", fault.wrap(edgekv.engine.engine.sample))
    elif stage == "detok":
        monkeypatch.setattr(IncrementalDetokenizer, "step",
                            fault.wrap(IncrementalDetokenizer.step))
    elif stage == "postprocess":
        monkeypatch.setattr(eng, "_postprocess", fault.wrap(eng._postprocess))
    elif stage == "between":  # after a whole step, before the next
        fault.after = True
        monkeypatch.setattr(eng, "step", fault.wrap(eng.step))
    else:
        raise AssertionError(stage)


STAGES = ["schedule", "copy_blocks", "run", "run_after", "sample", "detok", "postprocess",
          "between"]
CASES = [(cfg, entry, stage, exc, k)
         for cfg in CONFIGS
         for entry in ("generate", "stream", "chat")
         for stage in STAGES + (["swap_out", "swap_in", "swap_copy"] if cfg == "offload" else [])
         for exc, k in ((KeyboardInterrupt, 1 if stage.startswith("swap") else
                         2 if stage == "copy_blocks" else 3), (ValueError, 1))
         if not (stage.startswith("swap") and entry != "generate")]


def parked_blocks(llm) -> int:
    mgr = llm.engine.manager
    return len({b for s in llm.engine.scheduler.parked.values() if s.seq_id in mgr.tables
                for b in mgr.block_ids(s.seq_id) if b is not None})


def assert_consistent(llm, *live):
    """Integrity holds, and only ``live`` sequences are queued."""
    llm.check_integrity()
    sch = llm.engine.scheduler
    assert {s.seq_id for s in [*sch.running, *sch.waiting]} <= {s.seq_id for s in live}


def check_chat_continues(llm, ref, chat, name):
    """The parked chat's next reply is what a fresh LLM generates from its tokens."""
    chat.send("And then?", CHAT)
    seq = chat.seq
    assert len(seq.output_ids) == CHAT.max_tokens
    if name != "evict":  # an evicted history differs from one prefill of the same tokens
        want = ref.generate([seq.token_ids[: seq.num_prompt]], CHAT)[0].token_ids
        assert seq.output_ids == want


@pytest.mark.parametrize("name,entry,stage,exc,k", CASES,
                         ids=[f"{c}-{e}-{s}-{x.__name__}-{k}" for c, e, s, x, k in CASES])
def test_a_fault_at_any_stage_leaves_the_engine_consistent(setups, monkeypatch, name, entry,
                                                           stage, exc, k):
    llm, ref, want = setups(name)
    chat = llm.chat()
    background = llm.stream(BACKGROUND, GREEDY)  # another live request, mid-way
    try:
        _fault_case(llm, ref, want, monkeypatch, name, entry, stage, exc, k, chat, background)
    finally:  # a failed case leaves nothing behind for the next ones
        background.close()
        chat.reset()


def _fault_case(llm, ref, want, monkeypatch, name, entry, stage, exc, k, chat, background):
    chat.send("Hello!", CHAT)  # parked: its blocks stay for the next turn
    text = next(background)
    bg_seq = llm.engine.scheduler.running[-1]
    fault = Fault(exc, k)
    if stage == "copy_blocks" and entry == "generate" and name != "offload":
        fault.counts = bool  # forks: fail a real copy-on-write copy, not an empty call
    with monkeypatch.context() as m:
        inject(m, llm, stage, fault)
        with pytest.raises(exc, match="injected fault"):
            if entry == "generate":
                prompts, params = CONFIGS[name][1]
                llm.generate(prompts, params)
            elif entry == "stream":
                for _ in llm.stream(HEADER + "The quick brown fox", GREEDY):
                    pass
            else:
                chat.send("Tell me about the cache.", CHAT)
    assert fault.fired
    assert_consistent(llm, bg_seq)
    assert [o.token_ids for o in llm.generate(PROBES, GREEDY)] == want["probes"]
    assert text + "".join(background) == want["background"]
    check_chat_continues(llm, ref, chat, name)
    chat.reset()
    assert_consistent(llm)
    assert llm.kv_stats()["blocks_used"] == parked_blocks(llm) == 0
    if llm.engine.offloader is not None:
        assert llm.engine.manager.host_pool.num_used == 0


RETRY_STAGES = ["schedule", "copy_blocks", "run", "run_after", "sample", "detok", "postprocess"]


@pytest.mark.parametrize("name,stage", [(c, s) for c in CONFIGS for s in RETRY_STAGES + (
    ["swap_out", "swap_in", "swap_copy"] if c == "offload" else [])
    if not (c == "evict" and s in ("sample", "detok", "postprocess"))])  # beams only
def test_requests_that_outlive_a_fault_finish_exactly_as_without_it(setups, monkeypatch, name,
                                                                    stage):
    """Requests that are not aborted (as in a server: the fault was not theirs) retry the
    failed step and end exactly as in a run without the fault: seeded samples, forks,
    beams, eviction choices and copy-on-write blocks included."""
    llm, _, want = setups(name)
    eng = llm.engine
    prompts, params = CONFIGS[name][1]
    seqs = [eng.new_sequence(llm.encode(p), params) for p in prompts]
    for s in seqs:
        eng.add(s)
    fault = Fault(ValueError, 2 if stage in ("copy_blocks", "detok", "postprocess") else 1,
                  counts=bool if stage == "copy_blocks" and name != "offload" else None)
    inject(monkeypatch, llm, stage, fault)
    while not all(outputs.request_done(s) for s in seqs):
        try:
            eng.step()
        except ValueError as e:
            assert str(e) == "injected fault"
            eng.check_integrity()
    assert fault.fired
    assert completions([outputs.request_output(s) for s in seqs]) == want["workload"]
    eng.check_integrity()
    assert llm.kv_stats()["blocks_used"] == 0


def test_the_faulted_stages_really_run_in_each_configuration(setups):
    """The sweep's workloads reach every stage it injects into (else it proves nothing)."""
    llm, _, _ = setups("offload")
    calls = {"swap_out": 0, "swap_in": 0}
    off = llm.engine.offloader
    for stage in calls:
        orig = getattr(off, stage)
        setattr(off, stage, lambda sid, orig=orig, stage=stage: (
            calls.__setitem__(stage, calls[stage] + 1), orig(sid))[1])
    try:
        prompts, params = CONFIGS["offload"][1]
        llm.generate(prompts, params)
    finally:
        del off.swap_out, off.swap_in
    assert calls["swap_out"] > 0 and calls["swap_in"] > 0
    llm.check_integrity()


def test_ctrl_c_during_generate_is_safe(setups):
    """A real SIGINT, landing wherever Python is during a long generate."""
    llm, _, want = setups("prefix")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(100):  # until the signal lands
                llm.generate(["Once upon a time", "Hello! How are"] * 2, long)
    finally:
        timer.join()
    assert_consistent(llm)
    assert llm.kv_stats()["blocks_used"] == 0
    assert [o.token_ids for o in llm.generate(PROBES, GREEDY)] == want["probes"]


def test_a_batch_with_one_invalid_prompt_queues_nothing(setups):
    llm, _, want = setups("prefix")
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate([[5, 6, 7], [8, 9, 10_000]], GREEDY)
    with pytest.raises(ValueError, match="does not fit"):
        llm.generate(["Hello", [5] * 600], GREEDY)
    sch = llm.engine.scheduler
    assert not sch.running and not sch.waiting and not llm.engine.requests
    assert [o.token_ids for o in llm.generate(PROBES, GREEDY)] == want["probes"]
    llm.check_integrity()


def _queued_ids(llm):
    sch = llm.engine.scheduler
    return {s.seq_id for s in [*sch.running, *sch.waiting]}


@pytest.mark.parametrize("how", ["dropped", "cycle", "traceback"])
def test_a_dropped_stream_stops_its_sequence(setups, how):
    llm, _, want = setups("prefix")
    gen = llm.stream(BACKGROUND, SamplingParams(max_tokens=200, temperature=0.0,
                                                ignore_eos=True))
    next(gen)
    (seq,) = llm.engine.scheduler.running
    if how == "cycle":  # kept alive by a reference cycle until the collector runs
        holder = [gen]
        holder.append(holder)
        del holder
    elif how == "traceback":  # a frame of an exception's traceback holds it

        def consume(g):
            for _ in g:
                raise RuntimeError("stop")

        try:
            consume(gen)
        except RuntimeError as e:
            err = e
        del err
    gc_was = gc.isenabled()
    gc.disable()  # only the explicit collection below may finalize it
    try:
        del gen
        gc.collect()
    finally:
        if gc_was:
            gc.enable()
    assert [o.token_ids for o in llm.generate(PROBES, GREEDY)] == want["probes"]
    assert seq.seq_id not in _queued_ids(llm) and seq.finished
    assert seq.num_outputs < 10  # it did not run on inside generate
    assert_consistent(llm)
    assert llm.kv_stats()["blocks_used"] == 0


def test_a_stream_closed_mid_step_by_the_collector_stops_at_the_next_step(setups):
    """The collector may finalize a dropped stream inside another call's step: its abort
    waits for the next step, and nothing is changed under the running step."""
    llm, _, want = setups("prefix")
    gen = llm.stream(BACKGROUND, SamplingParams(max_tokens=200, temperature=0.0,
                                                ignore_eos=True))
    next(gen)
    (seq,) = llm.engine.scheduler.running
    eng, box = llm.engine, [gen]
    del gen
    orig = eng.runner.run

    def run_then_collect(batch, **kw):
        out = orig(batch, **kw)
        if box:
            box.pop().close()  # as the collector would, inside this step
            assert not seq.finished  # not yet: the step is still using it
        return out

    eng.runner.run = run_then_collect
    try:
        got = [o.token_ids for o in llm.generate(PROBES, GREEDY)]
    finally:
        del eng.runner.run
    assert got == want["probes"]
    assert seq.finished and seq.seq_id not in _queued_ids(llm)
    assert_consistent(llm)


def test_a_second_thread_gets_a_clear_error(setups):
    llm, _, want = setups("prefix")
    inside, release = threading.Event(), threading.Event()
    eng, orig = llm.engine, llm.engine.step

    def slow_step():
        inside.set()
        release.wait(10)
        return orig()

    eng.step = slow_step
    results = {}

    def first():
        results["first"] = [o.token_ids for o in llm.generate(PROBES, GREEDY)]

    t = threading.Thread(target=first)
    t.start()
    try:
        assert inside.wait(10)
        for call in (lambda: llm.generate(PROBES, GREEDY), lambda: next(llm.stream("Hi")),
                     lambda: llm.chat().send("Hi"), lambda: llm.score("Hello")):
            with pytest.raises(RuntimeError, match="being used by another thread"):
                call()
    finally:
        release.set()
        t.join(30)
        del eng.step
    assert results["first"] == want["probes"]
    assert_consistent(llm)
    assert [o.token_ids for o in llm.generate(PROBES, GREEDY)] == want["probes"]
    assert BUSY.startswith("this LLM is being used by another thread")


def test_a_stream_holds_the_engine_only_inside_next(setups):
    llm, _, want = setups("prefix")
    gen = llm.stream(BACKGROUND, GREEDY)
    text = next(gen)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault(
        "probes", [o.token_ids for o in llm.generate(PROBES, GREEDY)]))
    t.start()
    t.join(30)
    assert got["probes"] == want["probes"]
    assert text + "".join(gen) == want["background"]
    assert_consistent(llm)


def test_a_chat_message_too_long_leaves_the_conversation_as_it_was(setups):
    llm, ref, _ = setups("prefix")
    chat = llm.chat()
    chat.send("Hello!", CHAT)
    before = (list(chat.messages), list(chat.seq.token_ids), chat.num_cached_tokens)
    with pytest.raises(ValueError, match="does not fit"):
        chat.send("Hello! " * 400, CHAT)
    assert (chat.messages, chat.seq.token_ids, chat.num_cached_tokens) == before
    assert chat.seq.status is Status.FINISHED
    check_chat_continues(llm, ref, chat, "prefix")
    chat.reset()
    assert_consistent(llm)


@pytest.mark.parametrize("direction", ["out", "in"])
def test_a_swap_whose_copy_fails_changes_nothing(monkeypatch, direction):
    """All or nothing: the table keeps the blocks it had, whose bytes are untouched."""
    from edgekv.cache.block_manager import BlockManager
    from edgekv.cache.kv_cache import PagedKVCache
    from edgekv.cache.offload import Offloader
    from edgekv.config import CacheConfig

    dev = PagedKVCache(CacheConfig(1, 1, 16, 4, 16, "fp16"))
    host = PagedKVCache(CacheConfig(1, 1, 16, 4, 16, "fp16"))
    mgr = BlockManager(4, 16, num_host_blocks=4)
    off = Offloader(mgr, dev, host)
    mgr.append_slots(7, 40)  # 3 blocks
    for i, b in enumerate(mgr.block_ids(7)):
        dev.layers[0][0].data[b] = i + 1.0
    if direction == "in":
        off.swap_out(7)
    before = (list(mgr.block_ids(7)), dict(mgr.tables[7].host), sorted(mgr.pool.free_ids),
              sorted(mgr.host_pool.free_ids))

    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgekv.cache.offload, "copy_blocks_between", broken)
    with pytest.raises(KeyboardInterrupt):
        off.swap_out(7) if direction == "out" else off.swap_in(7)
    mgr.check_integrity()
    assert (list(mgr.block_ids(7)), dict(mgr.tables[7].host), sorted(mgr.pool.free_ids),
            sorted(mgr.host_pool.free_ids)) == before
    monkeypatch.undo()
    if direction == "in":
        off.swap_in(7)
    values = [dev.layers[0][0].data[b].unique().tolist() for b in mgr.block_ids(7)]
    assert values == [[1.0], [2.0], [3.0]]


def test_a_failed_step_leaves_eviction_scores_as_they_were(setups, monkeypatch):
    """The mass a failed step observed is not counted (its retry observes it again)."""
    llm, _, _ = setups("evict")
    eng = llm.engine
    prompts, params = CONFIGS["evict"][1]
    seqs = [eng.new_sequence(llm.encode(p), GREEDY) for p in prompts]
    for s in seqs:
        eng.add(s)
    for _ in range(3):
        eng.step()
    before, schedule = {}, eng.scheduler.schedule

    def schedule_then_snapshot():  # the step's own evictions stay: they are kept as made
        batch = schedule()
        before.update({sid: t.clone() for sid, t in eng.evictor.scores.items()})
        return batch

    monkeypatch.setattr(eng.scheduler, "schedule", schedule_then_snapshot)
    inject(monkeypatch, llm, "run_after", Fault(ValueError, 1))
    with pytest.raises(ValueError):
        eng.step()
    assert before and eng.evictor.scores.keys() == before.keys()
    assert all(torch.equal(eng.evictor.scores[sid], t) for sid, t in before.items())
    monkeypatch.undo()
    for s in seqs:
        eng.abort(s)
    eng.check_integrity()
