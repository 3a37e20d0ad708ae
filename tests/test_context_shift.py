"""Context shift: under eviction a sequence goes on past the model's context, its kept
keys re-rotated to positions inside the cache (edgekv/context_shift.py)."""

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.block_manager import BlockManager
from edgekv.context_shift import rotate_keys
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


def test_forked_samples_shift_their_shared_blocks_copy_on_write(llama_dir):
    """n > 1 samples share their prompt's blocks; a shift moves the shared ones into fresh
    blocks, so each sample still equals the same request run alone."""
    p = SamplingParams(max_tokens=2 * CTX, temperature=0.9, seed=11, ignore_eos=True)
    llm = shift_llm(llama_dir, "int8", kv_memory="8MiB")
    both = llm.generate([ids(30, seed=2)], SamplingParams(**{**p.__dict__, "n": 2}))[0]
    alone = [shift_llm(llama_dir, "int8", kv_memory="8MiB").generate(
        [ids(30, seed=2)], SamplingParams(**{**p.__dict__, "seed": 11 + j}))[0]
        for j in range(2)]
    assert [o.token_ids for o in both.outputs] == [o.token_ids for o in alone]
    assert llm.kv_stats()["blocks_used"] == 0
    llm.engine.manager.check_integrity()


def test_a_budget_larger_than_the_context_is_refused(llama_dir):
    with pytest.raises(ValueError, match="more than the model's context of 512"):
        shift_llm(llama_dir, budget=CTX + 8)
