"""PagedQuantizedCache inside a stock transformers model (tiny random Llama, fp32, CPU).

Reference: transformers' default DynamicCache on the same model and inputs.
fp32 storage is exact; fp16 must give the same greedy tokens; int8/int4 are held to
bounds on teacher-forced logits (mean KL to the reference, top-1 agreement).
"""

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from edgekv import CacheConfig, NoFreeBlocks
from edgekv.hf import KVPool, PagedQuantizedCache

from tiny_models import FAMILIES, build_tiny_model


@pytest.fixture(scope="module")
def model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def prompts(batch=1, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=g)  # (batch, length)


def greedy(model, ids, cache=None, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              past_key_values=cache, pad_token_id=0, **kw)


@torch.no_grad()
def teacher_forced(model, cache, ids, prefill=16):
    """Logits (batch, T, vocab): a prefill chunk, then one token per step (decode)."""
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def divergence(ref, got):
    """(mean KL(ref || got) per position, top-1 agreement)."""
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl.mean().item(), (ref.argmax(-1) == got.argmax(-1)).float().mean().item()


# ---- equivalence with the default cache ----------------------------------------------------
def test_fp32_storage_is_exact(model):
    ids = prompts(2, 64)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids)
    got = teacher_forced(model, PagedQuantizedCache(model.config, "fp32", "4MiB"), ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_its_history_back_exactly_in_fp32(tiny_model_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=torch.float32)
    ids = prompts(2, 40, seed=7)
    with torch.no_grad():
        full = model(ids).logits  # no cache at all
    got = teacher_forced(model, PagedQuantizedCache(model.config, "fp32", "1MiB"), ids, 24)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_greedy_generate_matches_default_cache(model, seed):
    ids = prompts(1, 20, seed)
    cache = PagedQuantizedCache(model.config, kv_format="fp16", kv_memory="4MiB")
    out = greedy(model, ids, cache)
    assert out.shape == (1, 52)
    assert torch.equal(out, greedy(model, ids))
    assert cache.get_seq_length() == 51  # the last token is sampled, never fed back
    assert cache.kv_stats()["blocks_used"] == 4  # ceil(51 / 16)


def test_fp16_batch_with_left_padding_matches_default_cache(model):
    ids = prompts(2, 20, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # row 1 is a shorter prompt, left-padded
    cache = PagedQuantizedCache(model.config, kv_format="fp16", kv_memory="4MiB")
    out = greedy(model, ids, cache, attention_mask=mask)
    assert torch.equal(out, greedy(model, ids, attention_mask=mask))


# the engine's bounds (tests/test_engine.py) on the same kind of random tiny Llama
@pytest.mark.parametrize("fmt, max_kl, min_top1", [
    ("fp16", 1e-6, 0.99),
    ("int8", 2e-4, 0.95),   # measured: mean KL 4-5e-5, top-1 0.98-0.99 (3 seeds)
    ("int4", 2e-2, 0.75),   # measured: mean KL ~8e-3, top-1 0.77-0.80
])
def test_quantized_formats_stay_within_bounds(model, fmt, max_kl, min_top1):
    ids = prompts(2, 96, seed=1)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids)
    got = teacher_forced(model, PagedQuantizedCache(model.config, fmt, "4MiB"), ids)
    kl, top1 = divergence(ref, got)
    assert kl < max_kl and top1 >= min_top1, (fmt, kl, top1)


def test_error_grows_as_bits_shrink(model):
    ids = prompts(1, 64, seed=2)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids)
    kls = [divergence(ref, teacher_forced(model, PagedQuantizedCache(model.config, f, "4MiB"),
                                          ids))[0] for f in ("fp16", "int8", "int4")]
    assert kls[0] < kls[1] < kls[2]


def test_beam_search_forks_blocks_and_matches_default_cache(model):
    ids = prompts(1, 20, seed=4)
    pool = KVPool(CacheConfig(2, 2, 32, num_blocks=64, block_size=16, kv_format="fp32"))
    cache = PagedQuantizedCache(model.config, pool=pool)
    out = greedy(model, ids, cache, num_beams=3)
    assert torch.equal(out, greedy(model, ids, num_beams=3))
    pool.check_integrity()  # ref counts agree with the forked tables


# ---- memory ----------------------------------------------------------------------------------
def test_blocks_return_to_a_shared_pool_when_the_cache_is_dropped(model):
    pool = KVPool(CacheConfig(2, 2, 32, num_blocks=32, block_size=16, kv_format="int8"))
    a = PagedQuantizedCache(model.config, pool=pool)
    b = PagedQuantizedCache(model.config, pool=pool)
    greedy(model, prompts(2, 20), a)
    greedy(model, prompts(1, 40, seed=5), b)
    used_a = 2 * 4  # 2 rows x ceil(51 / 16)
    assert pool.stats()["blocks_used"] == used_a + 5  # + ceil(71 / 16)
    del a
    gc.collect()
    assert pool.stats()["blocks_used"] == 5
    b.reset()
    assert pool.stats()["blocks_used"] == 0 and b.get_seq_length() == 0
    pool.check_integrity()
    own = PagedQuantizedCache(model.config, kv_format="int8", kv_memory="1MiB")
    assert torch.equal(greedy(model, prompts(1, 20), b), greedy(model, prompts(1, 20), own))


def test_a_full_pool_raises_a_clear_error(model):
    block = CacheConfig(2, 2, 32, num_blocks=1, block_size=16, kv_format="int8").bytes_per_block
    cache = PagedQuantizedCache(model.config, kv_format="int8", kv_memory=3 * block)
    with pytest.raises(NoFreeBlocks, match="pool is full.*larger kv_memory"):
        greedy(model, prompts(1, 20), cache)  # 3 blocks hold 48 tokens; 51 are needed


def test_auto_sized_pool_holds_the_models_context(model):
    cache = PagedQuantizedCache(model.config, kv_format="int4")
    greedy(model, prompts(2, 20), cache)
    plan, pool = cache.kv_plan, cache.pool
    assert plan is not None and plan.kv_bytes == pool.config.bytes_total
    assert pool.config.num_blocks * 16 == 2 * 512  # capped at batch x max_position


def test_crop_then_continue_equals_default_cache(model):
    ids = prompts(1, 40, seed=6)
    caches = [DynamicCache(config=model.config), PagedQuantizedCache(model.config, "fp32", "1MiB")]
    logits = []
    with torch.no_grad():
        for c in caches:
            model(ids[:, :30], past_key_values=c, use_cache=True)
            c.crop(-12)  # back to 18 tokens, inside the second block
            logits.append(model(ids[:, 18:40], past_key_values=c, use_cache=True).logits)
    assert caches[1].get_seq_length() == 40
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    caches[1].pool.check_integrity()


# ---- bad input -------------------------------------------------------------------------------
def test_bad_arguments_raise_value_errors(model, tmp_path):
    with pytest.raises(ValueError, match="unknown KV format"):
        PagedQuantizedCache(model.config, kv_format="int3")
    with pytest.raises(ValueError, match="memory size"):
        PagedQuantizedCache(model.config, kv_memory="8 gigs")
    mistral = build_tiny_model(tmp_path / "m", "mistral", tokenizer=False)
    cfg = AutoModelForCausalLM.from_pretrained(mistral).config
    cfg.sliding_window = 16
    with pytest.raises(ValueError, match="full-attention layers only"):
        PagedQuantizedCache(cfg)
    pool = KVPool(CacheConfig(3, 2, 32, num_blocks=4, kv_format="int8"))
    with pytest.raises(ValueError, match="pool stores 3 layers"):
        PagedQuantizedCache(model.config, pool=pool)
