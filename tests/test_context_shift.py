"""Context shift: under eviction a sequence goes on past the model's context, its kept
keys re-rotated to positions inside the cache (edgekv/cache/context_shift.py)."""

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.cache.block_manager import BlockManager
from edgekv.cache.context_shift import rotate_keys
from edgekv.eviction import EvictionConfig
from edgekv.models import ModelConfig
from edgekv.models.layers import RotaryEmbedding, rope_inv_freq

from tiny_models import build_tiny_model, hf_config

CTX = 512  # the tiny models' max_position_embeddings


def ids(n, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", ["llama", "llama3"])
def test_rotating_a_roped_key_by_minus_d_is_the_key_roped_at_p_minus_d(family):
    cfg = ModelConfig.from_hf(hf_config(family).to_dict(), "LlamaForCausalLM")
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, 4, cfg.head_dim, generator=g)  # (nb, Hkv, bs, D)
    p = torch.tensor([3000, 700, 513, 64, 4000, 20])
    d = torch.tensor([2990, 0, 500, 64, 3900, 7])
    pos = (p[:, None] + torch.arange(4)[None, :]).reshape(-1)  # (nb * bs,)

    def roped(at):
        x = k.permute(0, 2, 1, 3).reshape(-1, 2, cfg.head_dim)  # (nb * bs, Hkv, D)
        (y,) = rope(at, x)
        return y.reshape(6, 4, 2, cfg.head_dim).permute(0, 2, 1, 3)

    got = rotate_keys(roped(pos), d, rope_inv_freq(cfg))
    want = roped(pos - d.repeat_interleave(4))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)  # fp32 RoPE at p ~ 4K


def test_table_positions_follow_appends_evictions_truncates_and_forks():
    m = BlockManager(num_blocks=16, block_size=4)
    m.append_slots(0, 18)
    t = m.tables[0]
    assert t.positions == [0, 4, 8, 12, 16]
    m.evict(0, [1, 2])
    assert t.positions == [0, 12, 16] and t.position(9, 4) == 17
    m.append_slots(0, 5)  # 10 -> 15 cached tokens: the partial block fills, one new block
    assert t.positions == [0, 12, 16, 20] and t.position(14, 4) == 22
    m.fork(0, 1)
    assert m.shift_plan(1) == [(1, 8), (2, 8), (3, 8)]
    m.reposition(0, 1, m.pool.allocate(1)[0])  # shared: moved into a fresh block
    m.reposition(1, 1, m.pool.allocate(1)[0])
    assert m.tables[0].positions[:2] == [0, 4] and m.tables[1].positions[:2] == [0, 4]
    m.check_integrity()
    m.truncate(0, 6)
    assert m.tables[0].positions == [0, 4]
    m.check_integrity()


def shift_llm(path, kv_format="fp32", **kw):
    ev = EvictionConfig(kw.pop("policy", "streaming"), max_kv_tokens=kw.pop("budget", 64),
                        sink_tokens=kw.pop("sink_tokens", None))
    kw = dict(kv_memory="4MiB", dtype=torch.float32, block_size=8, eviction=ev) | kw
    return LLM(path, kv_format=kv_format, **kw)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_generate_four_contexts_in_one_request_with_eviction(llama_dir, policy):
    llm = shift_llm(llama_dir, "int8", policy=policy)
    n = 4 * CTX
    out = llm.generate([ids(40)], SamplingParams(max_tokens=n, temperature=0.0,
                                                 ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == n
    stats = llm.kv_stats()
    assert stats["context_shifts"] >= 4 and stats["blocks_used"] == 0
    llm.engine.manager.check_integrity()


def test_a_prompt_four_contexts_long_streams_through_the_budget(llama_dir):
    llm = shift_llm(llama_dir, "int8", policy="snapkv")
    out = llm.generate([ids(4 * CTX, seed=3)], SamplingParams(max_tokens=8, temperature=0.0,
                                                              ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert llm.kv_stats()["context_shifts"] >= 3
    llm.engine.manager.check_integrity()


def test_without_sinks_a_shift_changes_nothing_but_the_positions(tmp_path):
    """With no sink block every kept block moves by the same amount, so relative
    positions, and therefore every logit, are those of a model whose context is long
    enough never to shift (same weights, larger max_position_embeddings)."""
    short = build_tiny_model(tmp_path / "short", "llama")
    long = build_tiny_model(tmp_path / "long", "llama", max_position_embeddings=8 * CTX)
    tokens = ids(3 * CTX, seed=5)
    logits = []
    for path in (short, long):
        llm = shift_llm(path, policy="streaming", sink_tokens=0)
        logits.append(llm.score(tokens, chunk_size=1))
        shifts = llm.kv_stats()["context_shifts"]
        assert shifts >= 2 if path is short else shifts == 0
    torch.testing.assert_close(logits[0], logits[1], atol=2e-3, rtol=0)


def test_beams_and_samples_shift_their_shared_blocks_copy_on_write(tmp_path, monkeypatch):
    """Beams and n > 1 samples share blocks; without sinks a shift moves the shared ones
    (into fresh blocks) too, and every output equals that of a model whose context never
    needs a shift."""
    import edgekv.cache.context_shift as cs

    shared = []
    real = cs.ContextShift.shift

    def counting(self, seq_id):
        t, pool = self.manager.tables[seq_id], self.manager.pool
        shared.append(sum(pool.is_shared(t.block_ids[i])
                          for i, _ in self.manager.shift_plan(seq_id)))
        return real(self, seq_id)

    monkeypatch.setattr(cs.ContextShift, "shift", counting)
    short = build_tiny_model(tmp_path / "short", "llama")
    long = build_tiny_model(tmp_path / "long", "llama", max_position_embeddings=8 * CTX)
    requests = (SamplingParams(beam_width=3, max_tokens=CTX + 200),
                SamplingParams(n=3, max_tokens=CTX + 200, temperature=0.8, seed=4,
                               ignore_eos=True))
    outs = {}
    for path in (short, long):
        llm = shift_llm(path, policy="streaming", sink_tokens=0, kv_memory="8MiB")
        outs[path] = [[o.token_ids for o in llm.generate([ids(40, seed=7)], p)[0].outputs]
                      for p in requests]
        assert llm.kv_stats()["blocks_used"] == 0
        llm.check_integrity()
    assert sum(shared) > 0  # shared blocks did move
    assert outs[short] == outs[long]


def test_a_swapped_out_chat_shifts_when_it_comes_back(llama_dir):
    """Eviction with offload: the parked chat is swapped out between its turns, and a turn
    that needs a shift brings it back and shifts it."""
    per_block = 2 * 2 * 2 * 8 * 34  # int8, 2 layers, 2 KV heads, head_dim 32, block 8
    llm = LLM(llama_dir, kv_format="int8", dtype=torch.float32, block_size=8,
              kv_memory=12 * per_block, offload_memory=64 * per_block,
              eviction=EvictionConfig("streaming", max_kv_tokens=48))
    chat = llm.chat()
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    swapped = 0
    for _ in range(16):
        reply = chat.send("Once upon a time there was a small cache", p)
        assert chat.seq.num_outputs == 40 and reply
        llm.generate(["Hello! How are you today? " * 3] * 2,
                     SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
        swapped += bool(llm.engine.manager.tables[chat.seq.seq_id].host)
        llm.check_integrity()
    assert swapped > 0 and llm.kv_stats()["context_shifts"] > 0


@pytest.mark.parametrize("fail_at", [1, 2], ids=["fresh-blocks", "in-place-commit"])
def test_a_fault_inside_a_shift_changes_nothing(llama_dir, monkeypatch, fail_at):
    """The shift writes its fresh blocks before the table points at them: a failure while
    writing (or committing) leaks no block, and the next request is as on a fresh
    engine."""
    import edgekv.cache.context_shift as cs

    real, calls = cs.ContextShift._store, []

    def failing(self, *args, **kw):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kw)

    p = SamplingParams(max_tokens=CTX, temperature=0.0, ignore_eos=True)
    want = shift_llm(llama_dir, "int8").generate([ids(50)], p)[0].token_ids
    llm = shift_llm(llama_dir, "int8")
    monkeypatch.setattr(cs.ContextShift, "_store", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate([ids(50)], SamplingParams(max_tokens=2 * CTX, ignore_eos=True))
    monkeypatch.setattr(cs.ContextShift, "_store", real)
    llm.check_integrity()
    assert llm.kv_stats()["blocks_used"] == 0
    assert llm.generate([ids(50)], p)[0].token_ids == want


def test_a_budget_larger_than_the_context_is_refused(llama_dir):
    with pytest.raises(ValueError, match="more than the model's context of 512"):
        shift_llm(llama_dir, budget=CTX + 8)
