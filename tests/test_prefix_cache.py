"""Prefix caching, n > 1 sampling and copy-on-write through the engine."""

import pytest
import torch

from edgekv import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def shared_prompts(num, prefix_len, suffix_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 320, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, 320, (suffix_len,), generator=g).tolist()
            for _ in range(num)]


def make(llama_dir, kv_format="fp16", **kw):
    return LLM(llama_dir, kv_format=kv_format, kv_memory="8MiB", dtype=torch.float32, **kw)


def run_until_decoding(llm, ps, params):
    """Add the prompts and step until every one has its first token; return the seqs."""
    eng = llm.engine
    seqs = [eng.new_sequence(p, params) for p in ps]
    for s in seqs:
        eng.add(s)
    while any(s.num_outputs == 0 for s in seqs):
        eng.step()
    return seqs


@pytest.mark.parametrize("kv_format", ["fp16", "int4"])
def test_shared_prefix_is_held_once_and_outputs_match(llama_dir, kv_format):
    ps = shared_prompts(8, prefix_len=128, suffix_len=5)  # 8 full blocks + a partial one
    shared, alone = make(llama_dir, kv_format), make(llama_dir, kv_format,
                                                     prefix_caching=False)
    run_until_decoding(shared, ps, GREEDY)
    s = shared.kv_stats()
    assert s["blocks_used"] == 8 + 8  # one copy of the prefix + each request's own suffix
    assert s["prefix_hit_tokens"] == 7 * 128
    assert s["cached_blocks"] >= 8
    shared.engine.manager.check_integrity()
    run_until_decoding(alone, ps, GREEDY)
    assert alone.kv_stats()["blocks_used"] == 8 * 9
    assert alone.kv_stats()["prefix_hit_tokens"] == 0
    want = [o.token_ids for o in make(llama_dir, kv_format, prefix_caching=False)
            .generate(ps, GREEDY)]
    got = [o.token_ids for o in make(llama_dir, kv_format).generate(ps, GREEDY)]
    assert got == want


def test_freed_prefix_blocks_stay_cached_for_a_later_request(llama_dir):
    llm = make(llama_dir)
    (a, b) = shared_prompts(2, prefix_len=64, suffix_len=3, seed=1)
    first = llm.generate([a], GREEDY)[0].token_ids
    assert llm.kv_stats()["blocks_used"] == 0 and llm.kv_stats()["cached_blocks"] >= 4
    llm.generate([b], GREEDY)
    assert llm.kv_stats()["prefix_hit_tokens"] == 64
    assert llm.generate([a], GREEDY)[0].token_ids == first  # a full hit recomputes 1 token
    llm.engine.manager.check_integrity()


def test_n_samples_equal_separate_requests_with_derived_seeds(llama_dir):
    llm = make(llama_dir)
    (p,) = shared_prompts(1, prefix_len=40, suffix_len=0, seed=2)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    out = llm.generate([p], SamplingParams(**{**params.__dict__, "n": 4}))[0]
    assert len(out.outputs) == 4 and out.token_ids == out.outputs[0].token_ids
    assert not llm.engine.has_unfinished() and llm.kv_stats()["blocks_used"] == 0
    sep = [llm.generate([p], SamplingParams(**{**params.__dict__, "seed": 7 + j}))[0]
           for j in range(4)]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in sep]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # they do differ
    assert llm.kv_stats()["blocks_used"] == 0
    llm.engine.manager.check_integrity()


def test_samples_share_the_prompt_blocks(llama_dir):
    llm = make(llama_dir, prefix_caching=False)
    (p,) = shared_prompts(1, prefix_len=40, suffix_len=0, seed=3)  # 2 full blocks + 8
    (seq,) = run_until_decoding(llm, [p], SamplingParams(max_tokens=8, n=4, seed=1))
    mgr = llm.engine.manager
    tables = [mgr.block_ids(s.seq_id) for s in seq.samples]
    assert all(t[:2] == tables[0][:2] for t in tables)  # full prompt blocks: one copy
    assert all(mgr.pool.ref_counts[b] == 4 for b in tables[0][:2])
    llm.engine.step()  # each sample writes its first token: the partial block is copied
    tables = [mgr.block_ids(s.seq_id) for s in seq.samples]
    assert len({t[2] for t in tables}) == 4
    for _ in range(3):  # the forks are samples, not requests: they never fork again
        llm.engine.step()
        assert len(llm.engine.scheduler.running) == 4
    mgr.check_integrity()


def test_default_seeds_of_neighbouring_requests_samples_differ(llama_dir):
    llm = make(llama_dir)
    (p,) = shared_prompts(1, prefix_len=20, suffix_len=0, seed=5)
    params = SamplingParams(max_tokens=8, temperature=1.0, n=2, ignore_eos=True)
    a, b = llm.generate([p, p], params)
    streams = [tuple(o.token_ids) for o in a.outputs + b.outputs]
    assert len(set(streams)) == 4  # request 0's sample 1 is not request 1's sample 0


@pytest.mark.parametrize("kv_format", ["fp16", "int4"])
def test_copy_on_write_isolates_forked_samples_that_write_different_tokens(llama_dir,
                                                                        kv_format):
    """Samples forked off one prompt write different first tokens into the shared partial
    block's position; each must read only its own (codes and scales: int4) and so equal a
    lone request with its seed. Any write into the shared block would change another's."""
    llm = make(llama_dir, kv_format)
    (p,) = shared_prompts(1, prefix_len=20, suffix_len=0, seed=4)  # 1 full block + 4
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=11, ignore_eos=True)
    out = llm.generate([p], SamplingParams(**{**params.__dict__, "n": 3}))[0]
    assert len({o.token_ids[0] for o in out.outputs}) > 1  # they write different tokens
    alone = [llm.generate([p], SamplingParams(**{**params.__dict__, "seed": 11 + j}))[0]
             for j in range(3)]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone]


def test_bad_sampling_params_raise():
    with pytest.raises(ValueError):
        SamplingParams(n=0)
    with pytest.raises(ValueError):
        SamplingParams(n=2, beam_width=2)
