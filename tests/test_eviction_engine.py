"""Eviction through the whole engine: budgets held at every step, sinks and window kept
(checked on the cache's contents), exact outputs under the budget, long prompts, chats,
heavy hitters kept where streaming drops them."""

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.eviction import EvictionConfig
from edgekv.kernels import gather_blocks
from edgekv.quant import get_format
from edgekv.session.io import load_session, save_session

from tiny_models import build_tiny_model

POLICIES = ["streaming", "h2o", "snapkv"]


def prompt(n, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def fp32_llm(path, **kw):
    kw = dict(kv_format="fp32", kv_memory="2MiB", dtype=torch.float32, block_size=8) | kw
    return LLM(path, **kw)


@torch.inference_mode()
def layer0_keys(llm, token_ids):
    """Layer 0's cached keys of every position, computed from scratch: (T, Hkv, D).
    Layer 0's key depends only on the token and its position, not on the history, so it
    tells which positions a cache slot holds."""
    m = llm.model.model
    attn = m.layers[0].self_attn
    x = m.layers[0].input_layernorm(m.embed_tokens(torch.tensor(token_ids)))
    k = attn.k_proj(x).view(len(token_ids), attn.num_kv_heads, attn.head_dim)
    q = torch.zeros(len(token_ids), attn.num_heads, attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    _, k = m.rotary_emb(torch.arange(len(token_ids)), q, k)
    return k


def cached_layer0_keys(llm, seq):
    """The keys the cache holds for ``seq`` now, in cache order: (num_cached, Hkv, D)."""
    eng = llm.engine
    table = torch.tensor(eng.manager.block_ids(seq.seq_id))
    k_store, _ = eng.cache.layers[0]
    return gather_blocks(k_store, table, seq.num_cached, eng.cache.format).transpose(0, 1)


def run_checked(llm, seq, params, check):
    llm.engine.add(seq, params)
    steps = 0
    while not seq.finished:
        llm.engine.step()
        check()
        steps += 1
    return steps


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kv_format", ["fp16", "int4"])
def test_under_the_budget_every_policy_gives_the_no_eviction_output(llama_dir, policy,
                                                                    kv_format):
    ps = [prompt(n, seed=n) for n in (5, 37, 90)]
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    kw = dict(kv_format=kv_format, kv_memory="2MiB", max_num_batched_tokens=32)
    want = [o.token_ids for o in LLM(llama_dir, **kw).generate(ps, params)]
    llm = LLM(llama_dir, eviction=policy, max_kv_tokens=128, **kw)
    assert [o.token_ids for o in llm.generate(ps, params)] == want
    assert llm.kv_stats()["evicted_blocks"] == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_ten_times_the_budget_keeps_budget_sinks_and_window(llama_dir, policy):
    budget, sinks, window = 32, 8, 12
    cfg = EvictionConfig(policy, max_kv_tokens=budget, sink_tokens=sinks, window_tokens=window)
    llm = fp32_llm(llama_dir, eviction=cfg)
    seq = llm.engine.new_sequence(prompt(6), None)
    per_token = llm.kv_stats()["bytes_per_token"]

    evicted = []

    def check():
        assert llm.kv_stats()["bytes_used"] <= budget * per_token
        if seq.finished:  # its blocks are back in the pool
            return
        evicted.append(seq.num_evicted)
        cached = cached_layer0_keys(llm, seq)
        want = layer0_keys(llm, seq.token_ids[: seq.num_computed])
        torch.testing.assert_close(cached[:sinks], want[:sinks], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached[-window:], want[-window:], atol=1e-5, rtol=1e-5)

    params = SamplingParams(max_tokens=10 * budget, temperature=1.0, seed=1, ignore_eos=True)
    run_checked(llm, seq, params, check)
    assert seq.finish_reason == "length" and seq.num_outputs == 10 * budget
    s = llm.kv_stats()
    assert s["eviction"] == policy and s["max_kv_tokens"] == budget
    assert s["evicted_tokens"] == evicted[-1] >= 10 * budget - budget
    assert (s["evicted_mass"] is None) == (policy == "streaming")
    assert s["blocks_used"] == 0  # all returned when the sequence finished
    llm.engine.manager.check_integrity()


@pytest.mark.parametrize("policy", POLICIES)
def test_a_prompt_eight_times_the_budget_is_answered_within_it(llama_dir, policy):
    budget = 48
    llm = fp32_llm(llama_dir, eviction=policy, max_kv_tokens=budget)
    seq = llm.engine.new_sequence(prompt(8 * budget, seed=5), None)
    per_token = llm.kv_stats()["bytes_per_token"]

    def check():
        assert llm.kv_stats()["bytes_used"] <= budget * per_token

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    steps = run_checked(llm, seq, params, check)
    assert seq.num_outputs == 16 and steps >= 8 + 15  # streamed in chunks, then decoded
    assert llm.kv_stats()["evicted_tokens"] >= 7 * budget


def magnetize(llm, token: int):
    """Make layer 0 of a tiny Qwen2 send nearly all attention, from every query head at
    any distance, to wherever ``token`` sits: a constant query (the q bias) meets a large
    key that only ``token`` has, in the lowest RoPE frequency pair (dims 15 and 31 of 32,
    which turn by under 0.1 rad over 500 positions)."""
    m = llm.model.model
    attn = m.layers[0].self_attn
    D = attn.head_dim
    with torch.no_grad():
        m.embed_tokens.weight[:, 0] = 0.0
        m.embed_tokens.weight[token, 0] = 50.0
        m.layers[0].input_layernorm.weight[0] = 1.0
        for h in range(attn.num_heads):
            for d in (h * D + D // 2 - 1, h * D + D - 1):
                attn.q_proj.weight[d] = 0.0
                attn.q_proj.bias[d] = 5.0 if d % D == D // 2 - 1 else 0.0
        for g in range(attn.num_kv_heads):
            for d in (g * D + D // 2 - 1, g * D + D - 1):
                attn.k_proj.weight[d] = 0.0
                attn.k_proj.bias[d] = 0.0
            attn.k_proj.weight[g * D + D // 2 - 1, 0] = 10.0


@pytest.mark.parametrize("policy, kept", [("h2o", True), ("snapkv", True),
                                          ("streaming", False)])
def test_heavy_hitter_block_is_kept_by_h2o_and_dropped_by_streaming(tmp_path, policy, kept):
    magnet = 7
    path = build_tiny_model(tmp_path / "magnet", "qwen2", seed=4)
    cfg = EvictionConfig(policy, max_kv_tokens=48, sink_tokens=8, window_tokens=16)
    llm = fp32_llm(path, eviction=cfg)
    magnetize(llm, magnet)
    ids = prompt(20, seed=2)
    ids = [t if t != magnet else 8 for t in ids]
    ids[10] = magnet  # block 1, right after the sink block
    seq = llm.engine.new_sequence(ids, None)
    # the magnet draws the attention: layer 0 puts almost all its mass on it
    llm.engine.add(seq, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    found = []
    while not seq.finished:
        llm.engine.step()
        if seq.finished:
            break
        cached = cached_layer0_keys(llm, seq)
        want = layer0_keys(llm, seq.token_ids[:11])[10]
        found.append(bool(((cached - want).abs().amax((1, 2)) < 1e-4).any()))
    assert llm.kv_stats()["evicted_tokens"] >= 100
    assert all(found) == kept and found[-1] == kept
    if policy == "h2o":  # what the evicted blocks held is reported, and it is little
        s = llm.kv_stats()
        assert 0 < s["evicted_mass"] < 0.5 * s["observed_queries"]


def test_several_sequences_in_a_short_pool_evict_instead_of_preempting(llama_dir):
    cfg = EvictionConfig("streaming", sink_tokens=8, window_tokens=8)  # budget: the pool
    per_token = 2 * get_format("fp32").bytes_per_token(2, 32)  # 2 layers, 2 KV heads x 32
    llm = fp32_llm(llama_dir, eviction=cfg, kv_memory=10 * 8 * per_token)
    assert llm.kv_stats()["blocks_total"] == 10
    ps = [prompt(12, seed=s) for s in range(3)]
    outs = llm.generate(ps, SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [150] * 3
    s = llm.kv_stats()
    assert s["preemptions"] == 0 and s["evicted_tokens"] > 3 * 150 - 80
    llm.engine.manager.check_integrity()


@pytest.mark.parametrize("policy", POLICIES)
def test_forked_samples_evict_from_shared_blocks_like_separate_requests(llama_dir, policy):
    """n=3 samples share the prompt's blocks, then each evicts inside its own budget:
    dropping a shared block only drops that sample's reference, so each sample still
    equals a separate request with its seed (the forks copy the prompt's block scores)."""
    p = prompt(40, seed=9)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=5, ignore_eos=True)
    kw = dict(eviction=policy, max_kv_tokens=32, block_size=8, kv_memory="2MiB")
    llm = fp32_llm(llama_dir, prefix_caching=False, **kw)
    out = llm.generate([p], SamplingParams(**{**params.__dict__, "n": 3}))[0]
    alone = [fp32_llm(llama_dir, prefix_caching=False, **kw).generate(
        [p], SamplingParams(**{**params.__dict__, "seed": 5 + j}))[0] for j in range(3)]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone]
    assert llm.kv_stats()["evicted_blocks"] > 0 and llm.kv_stats()["blocks_used"] == 0
    llm.engine.manager.check_integrity()


def test_a_long_chat_stays_inside_the_budget_and_survives_save_and_load(llama_dir, tmp_path):
    budget = 64
    kw = dict(eviction="h2o", max_kv_tokens=budget)
    llm = fp32_llm(llama_dir, **kw)
    chat = llm.chat(system="Be brief.")
    per_token = llm.kv_stats()["bytes_per_token"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(5):
        chat.send(f"Tell me about the cache, part {i}.", params)
        assert llm.kv_stats()["bytes_used"] <= budget * per_token
        assert chat.num_cached_tokens <= budget
    evicted = chat.seq.num_evicted
    assert evicted > 0
    path = tmp_path / "chat.safetensors"
    saved = save_session(chat, path)
    assert saved == chat.num_cached_tokens
    want = chat.send("And then?", params)

    other = fp32_llm(llama_dir, **kw)
    chat2 = other.chat(system="Be brief.")
    assert load_session(chat2, path) == saved
    assert chat2.seq.num_evicted == evicted
    assert chat2.send("And then?", params) == want


def test_bad_eviction_input_is_a_clear_value_error(llama_dir):
    with pytest.raises(ValueError, match="unknown eviction policy 'lru'; valid: .*h2o"):
        LLM(llama_dir, eviction="lru")
    with pytest.raises(ValueError, match="max_kv_tokens needs an eviction policy"):
        LLM(llama_dir, max_kv_tokens=64)
    with pytest.raises(ValueError, match="budget is 4 blocks"):
        LLM(llama_dir, kv_memory="2MiB", block_size=8,
            eviction=EvictionConfig("h2o", max_kv_tokens=32, sink_tokens=16,
                                    window_tokens=16))


@pytest.mark.parametrize("kv_format", ["int8"])
def test_fused_decode_block_mass_drives_h2o_like_the_torch_path(llama_dir, kv_format):
    """With the Triton kernels (interpreted on CPU), the block mass comes from the fused
    decode kernel; h2o must evict the same blocks and produce the same tokens."""
    from edgekv.kernels import set_backend

    def run():
        llm = LLM(llama_dir, kv_format=kv_format, kv_memory="2MiB", dtype=torch.float32,
                  block_size=8, eviction="h2o", max_kv_tokens=32)
        out = llm.generate(prompt(9, seed=6), SamplingParams(max_tokens=40, temperature=0.0,
                                                             ignore_eos=True))
        return out[0].token_ids, llm.kv_stats()

    want, want_stats = run()
    set_backend("triton")
    try:
        got, stats = run()
    finally:
        set_backend(None)
    assert got == want
    assert stats["evicted_blocks"] == want_stats["evicted_blocks"] > 0
    assert stats["evicted_mass"] == pytest.approx(want_stats["evicted_mass"], rel=1e-4)
