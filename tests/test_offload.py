"""CPU offload: swapped-out and swapped-back sequences give exactly the unswapped output."""

import pytest
import torch

from edgekv import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PER_BLOCK = 2 * 2 * 32 * 2 * 2 * 16  # fp16: K+V, layers, head_dim, kv heads, bytes, tokens


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kv_format", ["fp16", "int4"])
def test_swapped_run_equals_unswapped_run(llama_dir, kv_format):
    ps = prompts([50, 60, 70, 80, 90, 45], seed=1)
    kw = dict(kv_format=kv_format, dtype=torch.float32, prefix_caching=False)
    want = [o.token_ids for o in LLM(llama_dir, kv_memory="8MiB", **kw).generate(ps, GREEDY)]
    big = LLM(llama_dir, kv_memory="8MiB", **kw)
    per_block = big.cache_config.bytes_per_block
    small = LLM(llama_dir, kv_memory=24 * per_block, offload_memory=64 * per_block, **kw)
    assert small.cache_config.num_blocks == 24
    got = [o.token_ids for o in small.generate(ps, GREEDY)]
    assert got == want
    s = small.kv_stats()
    assert s["swaps_out"] > 0 and s["swaps_in"] == s["swaps_out"]
    assert s["swapped_in_blocks"] == s["swapped_out_blocks"] > 0
    assert s["swap_bytes_out"] == s["swapped_out_blocks"] * per_block
    assert s["blocks_used"] == 0 and s["host_blocks_used"] == 0
    small.engine.manager.check_integrity()


def test_int4_moves_about_a_quarter_of_fp16_bytes(llama_dir):
    kw = dict(dtype=torch.float32, kv_memory="2MiB", offload_memory="1MiB")
    fp16 = LLM(llama_dir, kv_format="fp16", **kw).kv_stats()["swap_bytes_per_block"]
    int4 = LLM(llama_dir, kv_format="int4", **kw).kv_stats()["swap_bytes_per_block"]
    assert fp16 == PER_BLOCK and int4 < 0.4 * fp16  # codes are 1/4; scales add a little


def test_swapping_with_prefix_cache_and_samples(llama_dir):
    """Offload, prefix hits and forked samples together still match a roomy run."""
    base = prompts([40], seed=3)[0]
    ps = [base + p for p in prompts([5, 9, 13, 30], seed=4)]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=2, ignore_eos=True)
    kw = dict(kv_format="int8", dtype=torch.float32)
    want = [[c.token_ids for c in o.outputs]
            for o in LLM(llama_dir, kv_memory="8MiB", **kw).generate(ps, params)]
    per_block = LLM(llama_dir, kv_memory="1MiB", **kw).cache_config.bytes_per_block
    small = LLM(llama_dir, kv_memory=14 * per_block, offload_memory=64 * per_block, **kw)
    got = [[c.token_ids for c in o.outputs] for o in small.generate(ps, params)]
    assert got == want
    assert small.kv_stats()["swaps_out"] > 0
    small.engine.manager.check_integrity()


def test_offload_memory_too_small_raises(llama_dir):
    with pytest.raises(ValueError):
        LLM(llama_dir, kv_memory="1MiB", offload_memory=16)


def test_a_chat_whose_blocks_were_offloaded_saves_and_loads(llama_dir, tmp_path):
    """Chat A is parked, chat B's turns push A's blocks out to the host pool; saving A
    brings them back, and the saved session continues exactly as A itself does."""
    from edgekv.session.io import load_session, save_session

    kw = dict(kv_format="int8", dtype=torch.float32, prefix_caching=False)
    per_block = LLM(llama_dir, kv_memory="1MiB", **kw).cache_config.bytes_per_block
    llm = LLM(llama_dir, kv_memory=16 * per_block, offload_memory=64 * per_block, **kw)
    a, b = llm.chat(system="A"), llm.chat(system="B")
    a.send("Hi.", GREEDY)
    for i in range(6):
        b.send(f"Turn {i}.", GREEDY)
        if llm.engine.manager.is_swapped(a.seq.seq_id):
            break
    assert llm.engine.manager.is_swapped(a.seq.seq_id)
    path = tmp_path / "a.safetensors"
    saved = save_session(a, path)
    assert saved == a.num_cached_tokens > 0
    want = a.send("And then?", GREEDY)
    other = LLM(llama_dir, kv_memory="1MiB", **kw)
    c = other.chat(system="A")
    assert load_session(c, path) == saved
    assert c.send("And then?", GREEDY) == want
