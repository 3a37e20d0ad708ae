"""Age tiers (kv_tiers="fp16:R,int8:N,int4"): the syntax, the pools, demotion as blocks age
and under pressure, attention over blocks in several storages against the oracle, and the
engine end to end."""

import pytest
import torch

from edgekv import LLM, SamplingParams
from edgekv.cache.block_manager import BlockManager
from edgekv.cache.kv_cache import PagedKVCache
from edgekv.config import CacheConfig
from edgekv.kernels.dispatch import set_backend
from edgekv.kernels.tiered import (
    plan_tiers,
    read_blocks,
    tiered_decode_attention,
    tiered_decode_attention_ref,
    tiered_prefill_attention,
    tiered_prefill_attention_ref,
)
from edgekv.kernels.window_attention import ExactWindowKV
from edgekv.tiers import TierLayout, parse_tiers, tier_blocks
from edgekv.tiers.demote import Demoter

HKV, D, HQ = 2, 32, 4


# ---- the syntax and the pools --------------------------------------------------------
def test_parse_reads_the_exact_window_and_the_stored_tiers():
    s = parse_tiers("fp16:128, int8:2048, int4")
    assert (s.exact, s.formats, s.tokens) == (128, ("int8", "int4"), (2048,))
    assert str(s) == "fp16:128,int8:2048,int4"
    s = parse_tiers("int8:64,fp8:256,int4_nl")
    assert (s.exact, s.formats, s.tokens) == (0, ("int8", "fp8", "int4_nl"), (64, 256))


@pytest.mark.parametrize("text, why", [
    ("int4", "one stored tier"), ("fp16:128,int4", "one stored tier"),
    ("int8,int4", "needs a size"), ("int8:64,int4:32", "needs a size"),
    ("int8:0,int4", "positive"), ("int8:x,int4", "positive"), ("int3:8,int4", "unknown"),
    ("fp16:128,int8:64,int4", "must fit"), ("", "must be a string"),
])
def test_parse_refuses_bad_specs_in_one_line(text, why):
    with pytest.raises(ValueError, match=why) as e:
        parse_tiers(text)
    assert "\n" not in str(e.value)


def test_pools_fit_the_budget_and_bounded_tiers_take_at_most_half():
    spec = parse_tiers("int8:256,int4")
    per_block = (1000, 550)
    blocks = tier_blocks(spec, 2_000_000, per_block, 16, 512)
    cost = sum(b * c for b, c in zip(blocks, per_block, strict=True))
    assert cost <= 2_000_000 and 2_000_000 - cost < per_block[-1]
    assert blocks[0] == 4 * (16 + 1) + 32  # 4 sequences' windows and one prefill chunk
    small = tier_blocks(spec, 60_000, per_block, 16, 512)
    assert small[0] == 17 + 32 and small[1] >= 1  # one sequence's worth, past half
    with pytest.raises(ValueError, match="cannot hold the tiers"):
        tier_blocks(spec, 40_000, per_block, 16, 512)


def test_block_pool_keeps_a_free_list_per_tier():
    m = BlockManager(10, 8, tiers=(4, 6))
    assert m.pool.num_free == 4 and m.pool.num_free_in(1) == 6
    lo = m.pool.allocate(2, tier=1)
    assert all(4 <= b < 10 for b in lo) and m.pool.num_free_in(1) == 4
    m.pool.release(lo[0])
    assert m.pool.num_free_in(1) == 5 and m.pool.num_free == 4
    m.pool.release(lo[1])
    m.pool.check_integrity()


# ---- a tiered cache of random K/V, demoted by the real demoter -------------------------
def build(formats=("int8", "int4"), tokens=(24,), lens=(70, 9, 40), bs=8, seed=0):
    """Sequences of ``lens`` tokens written into a tiered cache and aged (blocks older than
    ``tokens`` moved down). Returns cache, manager, global tables (S, W) and each
    sequence's original K/V (L, Hkv, D)."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // bs) for n in lens) + 2
    layout = TierLayout(formats, tokens, (need,) * len(formats))
    cfg = CacheConfig(1, HKV, D, need * len(formats), bs, formats[0], layout)
    cache = PagedKVCache(cfg)
    m = BlockManager(cfg.num_blocks, bs, tiers=layout.blocks)
    kvs = []
    for s, n in enumerate(lens):
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        k[..., 3] *= 8  # an outlier channel
        slots, _ = m.append_slots(s, n)
        cache.write(0, k, v, torch.tensor(slots))
        kvs.append((k, v))
    Demoter(layout, m, cache).age()
    m.check_integrity()
    w = max(len(t.block_ids) for t in m.tables.values())
    tables = torch.tensor([m.block_ids(s) + [0] * (w - len(m.block_ids(s)))
                           for s in range(len(lens))], dtype=torch.int32)
    return cache, m, tables, kvs


def exact_kv(lens, R, seed=1, new=None):
    """Rings holding random exact values for each sequence's newest R positions."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(len(lens), R, HKV, D, generator=g).half()
    v = torch.randn(len(lens), R, HKV, D, generator=g).half()
    start = torch.tensor([max(0, n - R) for n in lens])
    slots = torch.arange(len(lens))
    if new is None:
        return ExactWindowKV(k, v, slots, start)
    return ExactWindowKV(k, v, slots, start, *new)


def test_reading_blocks_into_16_bits_in_chunks_equals_the_fp32_read(monkeypatch):
    """A tiered prefill reads the history straight into fp16 a few blocks at a time (its
    scratch is the 16-bit result, not an fp32 copy as well)."""
    import edgekv.kernels.tiered as tiered

    cache, m, _, _ = build()
    ids = m.block_ids(0) + m.block_ids(1)
    want_k, want_v = read_blocks(cache.tier_stores(0), ids)
    monkeypatch.setattr(tiered, "READ_CHUNK", 1)
    k, v = read_blocks(cache.tier_stores(0), ids, torch.float16)
    assert k.dtype == v.dtype == torch.float16
    assert torch.equal(k, want_k.half()) and torch.equal(v, want_v.half())


def test_ageing_moves_old_blocks_and_keeps_their_values():
    cache, m, tables, kvs = build()
    for s, (k, _) in enumerate(kvs):
        ids = m.block_ids(s)
        L = len(k)
        for i, b in enumerate(ids):  # due tier by the age of the block's newest token
            age = L - min((i + 1) * 8, L)
            assert m.pool.tier_of(b) == (0 if age < 24 else 1), (s, i, b)
        kd, _ = read_blocks(cache.tier_stores(0), ids)  # (n, Hkv, B, D)
        kd = kd.transpose(1, 2).flatten(0, 1)[:L]
        tol = torch.tensor([0.05 if m.pool.tier_of(ids[p // 8]) == 0 else 0.5
                            for p in range(L)])  # int8 / int4 from int8 codes
        err = (kd - k).abs().amax(dim=(1, 2)) / k.abs().amax(dim=(1, 2))
        assert (err < tol).all()


@pytest.mark.parametrize("formats, tokens", [
    (("int8", "int4"), (24,)), (("int8", "int4_nl"), (16,)), (("fp8", "int4_g32"), (24,)),
    (("int8", "fp8", "int4"), (16, 16)),
])
@pytest.mark.parametrize("R", [0, 8])
def test_decode_over_tiers_equals_the_oracle(formats, tokens, R):
    lens = (70, 9, 40, 33)
    cache, m, tables, _ = build(formats, tokens, lens)
    stores = cache.tier_stores(0)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    split = plan_tiers([m.block_ids(s) for s in range(len(lens))], list(lens),
                       cache.offsets, 8, "cpu")
    assert sum(split.lens).tolist() == list(lens)
    q = torch.randn(len(lens), HQ, D, generator=torch.Generator().manual_seed(2))
    exact = exact_kv(lens, R) if R else None
    want = tiered_decode_attention_ref(q, stores, tables, seq_lens, D**-0.5, exact)
    got = tiered_decode_attention(q, stores, tables, split, seq_lens, D**-0.5, exact)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("R", [0, 8])
def test_prefill_over_tiers_equals_the_oracle(R):
    lens, new = (70, 9, 40), (5, 9, 1)
    cache, m, tables, _ = build(lens=lens)
    stores = cache.tier_stores(0)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(new), HQ, D, generator=g)
    cu = torch.tensor([0, 5, 14, 15], dtype=torch.int32)
    exact = None
    if R:
        nk, nv = torch.randn(sum(new), HKV, D, generator=g), torch.randn(sum(new), HKV, D)
        exact = exact_kv([n - a for n, a in zip(lens, new, strict=True)], R, new=(nk, nv))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = tiered_prefill_attention_ref(q, stores, tables, seq_lens, cu, D**-0.5, exact)
    got = tiered_prefill_attention(q, stores, tables, seq_lens, cu, D**-0.5, exact)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


def test_triton_kernels_read_mixed_tiers_equal_to_the_oracle():
    pytest.importorskip("triton")
    lens = (70, 9, 40)
    cache, m, tables, _ = build(lens=lens)
    stores = cache.tier_stores(0)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    split = plan_tiers([m.block_ids(s) for s in range(len(lens))], list(lens),
                       cache.offsets, 8, "cpu")
    q = torch.randn(len(lens), HQ, D, generator=torch.Generator().manual_seed(4))
    want = tiered_decode_attention_ref(q, stores, tables, seq_lens, D**-0.5)
    qp = torch.randn(15, HQ, D, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 5, 14, 15], dtype=torch.int32)
    want_p = tiered_prefill_attention_ref(qp, stores, tables, seq_lens, cu, D**-0.5)
    set_backend("triton")
    try:
        got = tiered_decode_attention(q, stores, tables, split, seq_lens, D**-0.5)
        got_p = tiered_prefill_attention(qp, stores, tables, seq_lens, cu, D**-0.5)
    finally:
        set_backend(None)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_p, want_p, atol=3e-3, rtol=3e-3)


def test_a_partial_block_cut_back_into_an_older_tier_is_copied_up_before_writing():
    cache, m, tables, kvs = build(lens=(70,))
    old = m.block_ids(0)[1]
    assert m.pool.tier_of(old) == 1
    m.truncate(0, 13)  # block 1 (tokens 8..15) is kept, partial, in the int4 tier
    slots, copies = m.append_slots(0, 3)
    (src, dst), = copies
    assert src == old and m.pool.tier_of(dst) == 0 and m.block_ids(0)[1] == dst
    cache.copy_blocks(copies)
    m.check_integrity()
    a, _ = read_blocks(cache.tier_stores(0), [src, dst])
    torch.testing.assert_close(a[1], a[0], atol=0.02 * a.abs().max().item(), rtol=0)
    assert all(s // 8 == dst for s in slots)


# ---- the engine ------------------------------------------------------------------------
def prompt(n, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def tiered_llm(path, tiers="fp16:8,int8:32,int4", memory="2MiB", **kw):
    return LLM(path, kv_tiers=tiers, kv_memory=memory, dtype=torch.float32, block_size=8,
               **kw)


@torch.inference_mode()
def layer0_keys(llm, token_ids):
    """Layer 0's keys of every position computed from scratch, (T, Hkv, D): they depend
    on the token and its position only, so they tell which position a slot holds."""
    m = llm.model.model
    attn = m.layers[0].self_attn
    x = m.layers[0].input_layernorm(m.embed_tokens(torch.tensor(token_ids)))
    k = attn.k_proj(x).view(len(token_ids), attn.num_kv_heads, attn.head_dim)
    q = torch.zeros(len(token_ids), attn.num_heads, attn.head_dim)
    _, k = m.rotary_emb(torch.arange(len(token_ids)), q, k)
    return k


def check_tiers(llm, seq, window=32, bs=8):
    """Every block of ``seq`` sits in the tier its age puts it in; tier 0 holds at most
    the window and one straddling block."""
    eng = llm.engine
    eng.check_integrity()
    t = eng.manager.tables[seq.seq_id]
    tiers = [eng.manager.pool.tier_of(b) for b in t.block_ids]
    for i, tier in enumerate(tiers):
        age = t.num_tokens - min((i + 1) * bs, t.num_tokens)
        assert tier == (0 if age < window else 1), (i, age, tiers)
    in_top = sum(min(bs, t.num_tokens - i * bs) for i, x in enumerate(tiers) if x == 0)
    assert in_top <= window + bs - 1
    return tiers


def test_ten_times_the_tier_keeps_tiers_in_size_and_tokens_in_their_pool(llama_dir):
    llm = tiered_llm(llama_dir)
    seq = llm.engine.new_sequence(prompt(20), None, keep_cache=True)  # kept when finished
    llm.engine.add(seq, SamplingParams(max_tokens=330, temperature=0.0, ignore_eos=True))
    steps = 0
    while not seq.finished:
        llm.engine.step()
        check_tiers(llm, seq)
        steps += 1
    assert seq.num_tokens == 350 and steps >= 330
    stats = llm.kv_stats()
    assert stats["tier_demoted_blocks"] >= 350 // 8 - 5
    top, low = stats["tiers"]
    assert top["live_tokens"] + low["live_tokens"] == seq.num_cached
    assert low["live_tokens"] >= 350 - 40 and top["format"] == "int8"
    # each slot's layer-0 key is nearest to its own position's key, in either pool
    ref = layer0_keys(llm, seq.token_ids[: seq.num_cached])  # (T, Hkv, D)
    eng = llm.engine
    ids = eng.manager.block_ids(seq.seq_id)
    k, _ = read_blocks(eng.cache.tier_stores(0), ids)
    k = k.transpose(1, 2).flatten(0, 1)[: seq.num_cached]  # (T, Hkv, D)
    dist = torch.cdist(k.flatten(1), ref.flatten(1))  # (T, T)
    assert (dist.argmin(1) == torch.arange(len(ref))).all()
    err = (k - ref).norm(dim=-1).mean(-1) / ref.norm(dim=-1).mean(-1)  # (T,)
    tier = torch.tensor([eng.manager.pool.tier_of(ids[p // 8]) for p in range(len(ref))])
    assert err[tier == 0].max() < 0.03 and 0.03 < err[tier == 1].mean() < 0.2


def test_tiered_engine_equals_the_oracle_backend(llama_dir):
    p = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [prompt(70, seed=1), prompt(9, seed=2)]
    llm = tiered_llm(llama_dir)
    out = llm.generate(prompts, p)
    assert llm.kv_stats()["tier_demoted_blocks"] > 5
    set_backend("reference")
    try:
        want = tiered_llm(llama_dir).generate(prompts, p)
    finally:
        set_backend(None)
    for a, b in zip(out, want, strict=True):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor([x[0] for x in a.outputs[0].logprobs])
        lp_b = torch.tensor([x[0] for x in b.outputs[0].logprobs])
        torch.testing.assert_close(lp_a, lp_b, atol=1e-3, rtol=0)


def test_samples_and_prefix_hits_share_tiered_blocks(llama_dir):
    llm = tiered_llm(llama_dir, tiers="int8:16,int4")
    ids = prompt(100, seed=3)
    seq = llm.engine.new_sequence(ids, None)
    llm.engine.add(seq, SamplingParams(max_tokens=20, temperature=1.0, n=3, seed=1))
    shared_low = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        llm.engine.check_integrity()
        pool = llm.engine.manager.pool
        shared_low = max(shared_low, sum(pool.ref_counts[b] == 3 for b in
                                         range(pool.starts[1], pool.num_blocks)))
    assert shared_low >= 8  # the prompt's old blocks: demoted once, held by all three
    before = llm.kv_stats()["prefix_hit_tokens"]
    out = llm.generate([ids], SamplingParams(max_tokens=5, temperature=0.0))
    assert llm.kv_stats()["prefix_hit_tokens"] - before >= 88  # int4 blocks found again
    assert len(out[0].token_ids) == 5
    llm.engine.check_integrity()


def test_pressure_demotes_early_instead_of_preempting(llama_dir):
    # room in the int8 tier for one sequence's window and one chunk: four sequences
    # decoding together push each other's blocks down early
    llm = tiered_llm(llama_dir, tiers="int8:64,int4", memory=120_000,
                     max_num_batched_tokens=64)
    assert llm.cache_config.tiers.blocks[0] < 4 * (64 // 8 + 1)
    p = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    outs = llm.generate([prompt(30, seed=s) for s in range(4)], p)
    assert all(len(o.token_ids) == 60 for o in outs)
    s = llm.kv_stats()
    assert s["tier_early_blocks"] > 0 and s["preemptions"] == 0
    llm.engine.check_integrity()


def test_a_failed_demotion_leaves_the_engine_as_it_was(llama_dir, monkeypatch):
    llm = tiered_llm(llama_dir)
    seq = llm.engine.new_sequence(prompt(20, seed=4), None)
    llm.engine.add(seq, SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))
    calls = {"n": 0}
    real = PagedKVCache.transcode

    def flaky(self, pairs):
        calls["n"] += bool(pairs)
        if pairs and calls["n"] % 3 == 0:
            raise RuntimeError("injected")
        return real(self, pairs)

    monkeypatch.setattr(PagedKVCache, "transcode", flaky)
    failures = 0
    while not seq.finished:
        try:
            llm.engine.step()
        except RuntimeError:
            failures += 1
        llm.engine.check_integrity()
    assert failures > 0 and len(seq.output_ids) == 80
    monkeypatch.setattr(PagedKVCache, "transcode", real)
    assert len(llm.generate([prompt(9)], SamplingParams(max_tokens=3))[0].token_ids) == 3


@pytest.mark.parametrize("kw, why", [
    ({"kv_format": "int4"}, "leave kv_format out"),
    ({"exact_window": 16}, "leave exact_window out"),
    ({"eviction": "h2o", "max_kv_tokens": 64}, "eviction or offload"),
    ({"offload_memory": "1MiB"}, "eviction or offload"),
    ({"kv_tiers": "int8:32"}, "one stored tier"),
])
def test_llm_refuses_what_tiers_do_not_take(llama_dir, kw, why):
    kw = {"kv_tiers": "fp16:8,int8:32,int4"} | kw
    with pytest.raises(ValueError, match=why):
        LLM(llama_dir, kv_memory="1MiB", **kw)


# ---- sessions ----------------------------------------------------------------------------
def test_sessions_save_and_load_tiered_caches(llama_dir, tmp_path):
    from edgekv.session.io import load_session, save_session

    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    chat = tiered_llm(llama_dir, tiers="int8:32,int4").chat()
    for turn in ("Once upon a time there was a small cache.", "It held many keys."):
        chat.send(turn, greedy)
    eng = chat.llm.engine
    ids = list(eng.manager.block_ids(chat.seq.seq_id))
    tiers = [eng.manager.pool.tier_of(b) for b in ids]
    assert 0 in tiers and 1 in tiers
    want_k, want_v = read_blocks(eng.cache.tier_stores(1), ids)
    path = tmp_path / "s.safetensors"
    save_session(chat, path)
    cached = chat.seq.num_cached
    reply = chat.send("And then?", greedy)

    for spec in ("int8:32,int4", "fp16:8,int8:48,int4"):  # other sizes load too
        other = tiered_llm(llama_dir, tiers=spec).chat()
        assert load_session(other, path) == cached
        e2 = other.llm.engine
        ids2 = e2.manager.block_ids(other.seq.seq_id)
        assert [e2.manager.pool.tier_of(b) for b in ids2] == tiers  # each block in its tier
        k, v = read_blocks(e2.cache.tier_stores(1), ids2)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)  # the codes, as they were
        e2.check_integrity()
        again = other.send("And then?", greedy)
        if spec == "int8:32,int4":
            assert again == reply  # the next turn reads the same cache
        e2.check_integrity()

    with pytest.raises(ValueError, match="kv_format"):  # a one-storage cache refuses it
        load_session(LLM(llama_dir, kv_memory="2MiB", dtype=torch.float32, block_size=8,
                         kv_format="int8").chat(), path)


# ---- the command line ----------------------------------------------------------------------
def test_cli_takes_tiers_and_refuses_bad_ones_in_one_line(llama_dir):
    from click.testing import CliRunner

    from edgekv.cli.main import main

    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv-tiers",
                                  "int8:32", "hi"])
    assert r.exit_code == 2 and "one stored tier" in r.output
    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv-tiers",
                                  "fp16:8,int8:32,int4", "--kv", "int4", "hi"])
    assert r.exit_code == 2 and "leave kv_format out" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["chat", "--model", str(llama_dir), "--kv-tiers",
                                  "fp16:8,int8:32,int4", "--kv-memory", "1MiB", "--max-tokens",
                                  "60", "--temperature", "0"],
                           input="Once upon a time there was a small cache.\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "tiers fp16:8,int8:32,int4" in r.output  # the status line
    assert "tier 0 int8 (newest 32 tokens)" in r.output and "tier 1 int4 (older" in r.output


# ---- regressions: reserved slots, three tiers, a full tier ----------------------------
def test_pressure_never_moves_slots_reserved_but_not_yet_written(llama_dir):
    # a tight newest tier: long prompts arriving while one sequence decodes make the
    # scheduler relieve it in the same step that reserved their chunks
    llm = LLM(llama_dir, kv_tiers="int8:16,int4", kv_memory=60_000, dtype=torch.float32,
              block_size=8, max_num_batched_tokens=128)
    eng, g = llm.engine, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    first = eng.new_sequence(prompt(20, 1), None)
    eng.add(first, g)
    for _ in range(3):
        eng.step()
    for n, seed in ((100, 2), (60, 3)):
        eng.add(eng.new_sequence(prompt(n, seed), None), g)
    steps = 0
    while eng.has_unfinished():
        eng.step()
        eng.check_integrity()
        steps += 1
        assert steps < 200
    assert llm.kv_stats()["tier_early_blocks"] > 0


def test_three_tiers_move_each_block_once_with_its_values():
    bs, layout = 8, TierLayout(("int8", "int8", "int8"), (16, 16), (6, 2, 20))
    cfg = CacheConfig(1, 1, D, sum(layout.blocks), bs, "int8", layout)
    cache, m = PagedKVCache(cfg), BlockManager(cfg.num_blocks, bs, tiers=layout.blocks)
    dm = Demoter(layout, m, cache)
    for L in range(8, 72, 8):  # 8 tokens a step; the middle tier (2 blocks) is short
        slots, _ = m.append_slots(0, 8)
        k = torch.arange(L - 7, L + 1).float()[:, None, None].expand(8, 1, D).clone()
        cache.write(0, k, k, torch.tensor(slots))
        dm.age()
        m.check_integrity()
        got, _ = read_blocks(cache.tier_stores(0), m.block_ids(0))
        assert torch.equal(got[:, 0, :, 0].flatten()[:L].round(), torch.arange(1, L + 1.0))
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [2] * 4 + [1] * 2 + [0] * 2


def test_blocks_left_behind_by_a_full_tier_move_when_room_comes_oldest_first():
    bs, layout = 8, TierLayout(("int8", "int4"), (16,), (12, 8))
    cfg = CacheConfig(1, 1, D, sum(layout.blocks), bs, "int8", layout)
    cache, m = PagedKVCache(cfg), BlockManager(cfg.num_blocks, bs, tiers=layout.blocks)
    dm = Demoter(layout, m, cache)
    m.append_slots(1, 48)
    dm.age()  # another sequence takes 4 of the int4 tier's 8 blocks
    m.append_slots(0, 64)
    dm.age()  # 6 of this one's blocks are due there, 4 fit: its oldest 4
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [1] * 4 + [0] * 4
    m.free(1)
    m.append_slots(0, 8)
    dm.age()  # room again: the two left behind move too
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [1] * 7 + [0] * 2
    m.check_integrity()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4_nl", "fp8"])
def test_compiled_cpu_decode_returns_the_log_sum_exp_of_the_torch_path(fmt, monkeypatch):
    from edgekv.kernels.cpu_decode import paged_decode_attention_cpu

    cache, m, tables, _ = build((fmt, "int4"), (24,), (70, 9, 40))
    k, v, f, _ = cache.tier_stores(0)[0]
    split = plan_tiers([m.block_ids(s) for s in range(3)], [70, 9, 40], cache.offsets, 8,
                       "cpu")
    q = torch.randn(3, HQ, D, generator=torch.Generator().manual_seed(6))
    args = (q, k, v, split.tables[0], split.lens[0], f, D**-0.5)
    compiled = paged_decode_attention_cpu(*args, return_lse=True)
    monkeypatch.setenv("EDGEKV_CPU_JIT", "0")
    plain = paged_decode_attention_cpu(*args, return_lse=True)
    for a, b in zip(compiled, plain, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_a_table_cut_back_and_grown_again_ages_its_new_blocks():
    # a chat that drops its oldest turns cuts its table back and prefills again: the
    # blocks written after the cut, below the old last-tier mark, must age too
    bs, layout = 8, TierLayout(("int8", "int4"), (16,), (20, 20))
    cfg = CacheConfig(1, 1, D, sum(layout.blocks), bs, "int8", layout)
    cache, m = PagedKVCache(cfg), BlockManager(cfg.num_blocks, bs, tiers=layout.blocks)
    dm = Demoter(layout, m, cache)
    for _ in range(8):
        m.append_slots(0, 8)
        dm.age()
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [1] * 6 + [0] * 2
    m.truncate(0, 16)  # back to two (int4) blocks, then one long prefill chunk
    m.append_slots(0, 64)
    dm.age()
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [1] * 8 + [0] * 2
    m.free(0)  # a new table under the same id starts from nothing
    for _ in range(4):
        m.append_slots(0, 8)
        dm.age()
    assert [m.pool.tier_of(b) for b in m.block_ids(0)] == [1] * 2 + [0] * 2
    m.check_integrity()


def test_a_tiered_chat_saved_before_anything_is_cached_loads(llama_dir, tmp_path):
    from edgekv.session.io import load_session, save_session

    path = tmp_path / "empty.safetensors"
    save_session(tiered_llm(llama_dir).chat(), path)
    chat = tiered_llm(llama_dir).chat()
    assert load_session(chat, path) == 0
    chat.llm.engine.check_integrity()


def test_window_bytes_of_per_layer_formats_with_an_exact_ring():
    from edgekv.eval.subjects import window_bytes

    c = CacheConfig(2, HKV, D, 10, 8, "int8,int4")
    fp16 = CacheConfig(2, HKV, D, 10, 8, "fp16").bytes_per_token
    assert window_bytes(c, 64, 8) == 64 * c.bytes_per_token + 8 * fp16
