"""The exact window (LLM(exact_window=R)): each sequence's newest tokens kept exact in an
fp16 ring beside the quantized blocks, and read from there by attention."""

import pytest
import torch
from click.testing import CliRunner
from test_reference_attention import HKV, D, build

from edgekv import LLM, SamplingParams
from edgekv.cache.exact_window import ExactWindow
from edgekv.cli.main import main
from edgekv.kernels import paged_decode_attention_ref, paged_prefill_attention_ref
from edgekv.kernels.dispatch import (
    paged_decode_attention,
    paged_prefill_attention,
    set_backend,
)
from edgekv.kernels.window_attention import ExactWindowKV


# ---- the ring's bookkeeping ------------------------------------------------------------
def window(R=8, slots=4, alive=lambda s: True):
    return ExactWindow(1, HKV, D, R, "cpu", max_slots=slots, alive=alive)


def test_ring_continues_keeps_the_last_R_and_restarts_on_a_jump():
    w = window(R=8)
    st = w.step([7], [0], [20])  # a 20-token prefill: only its last 8 enter the ring
    assert st.write_index.tolist() == [-1] * 12 + [p % 8 for p in range(12, 20)]
    assert st.start.tolist() == [0]  # the chunk's queries read their windows exact
    assert (w.rings[7].start, w.rings[7].end) == (12, 20)
    st = w.step([7], [20], [21])  # decode continues it
    assert st.start.tolist() == [12] and st.write_index.tolist() == [20 % 8]
    st = w.step([7], [18], [19])  # a rewind to 18: the ring still holds 13..17
    assert st.start.tolist() == [13] and (w.rings[7].start, w.rings[7].end) == (13, 19)
    st = w.step([7], [40], [41])  # not a continuation (swapped back in): starts over
    assert st.start.tolist() == [40]


def test_rings_of_freed_sequences_are_reused_before_the_storage_grows():
    live = set(range(1, 7))
    w = window(R=4, slots=8, alive=lambda s: s in live)
    w.step([1, 2], [0, 0], [3, 3])
    assert w.num_slots == 4
    w.step([3], [0], [1])
    live.discard(1)
    w.step([4, 5], [0, 0], [1, 1])  # 4 slots: 1's ring is taken back, no growth
    assert w.num_slots == 4 and 1 not in w.rings and w.reclaimed == 0
    w.step([6], [0], [1])  # all alive and in use: grows
    assert w.num_slots == 8


def test_when_every_ring_is_busy_the_least_recently_written_is_reclaimed():
    w = window(R=4, slots=2)
    w.step([1], [0], [2])
    w.step([2], [0], [2])
    w.step([2], [2], [3])
    st = w.step([3], [0], [1])
    assert 1 not in w.rings and w.reclaimed == 1 and st.start.tolist() == [0]
    st = w.step([4, 5, 6], [0, 0, 0], [1, 1, 1])  # more sequences than rings: one reads
    assert sorted(st.start.tolist()) == [0, 0, 1]  # the blocks this step (start = end)


def test_fork_copies_the_parents_ring():
    w = window(R=4)
    st = w.step([1], [0], [3])
    k = torch.randn(3, HKV, D)
    w.write(0, k, -k, st)
    w.fork(1, 2)
    st = w.step([2], [3], [4])
    assert st.start.tolist() == [0]
    ring_k, ring_v = w.layers[0]
    assert torch.equal(ring_k[w.rings[2].slot, :3], k.half())
    assert torch.equal(ring_v[w.rings[2].slot, :3], (-k).half())


# ---- attention reads the ring ----------------------------------------------------------
def ring_exact(kvs, R, held, new=None):
    """Rings (slot = sequence) holding positions held[s] = (start, end) of each sequence's
    K/V in fp16; ``new``: (a, L) per sequence, the prefill chunk's own K/V."""
    k = torch.zeros(len(kvs), R, HKV, D, dtype=torch.float16)
    v = torch.zeros_like(k)
    for s, ((ks, vs), (lo, hi)) in enumerate(zip(kvs, held, strict=True)):
        for c in range(lo, hi):
            k[s, c % R], v[s, c % R] = ks[c].half(), vs[c].half()
    new_k = new_v = None
    if new is not None:
        new_k = torch.cat([ks[a:L] for (ks, _), (a, L) in zip(kvs, new, strict=True)])
        new_v = torch.cat([vs[a:L] for (_, vs), (a, L) in zip(kvs, new, strict=True)])
    return ExactWindowKV(k, v, torch.arange(len(kvs)), torch.tensor([lo for lo, _ in held]),
                     new_k, new_v)


def windowed_dense(q, k, v, fmt, R, start, causal_offset):
    """Dense attention: query at position p reads key j in fp16 where start <= j and
    p - R < j <= p, the blocks' value otherwise."""
    kd, vd = fmt.dequantize(fmt.quantize(k)), fmt.dequantize(fmt.quantize(v))
    ke, ve = k.half().float(), v.half().float()
    G = q.shape[1] // HKV
    kd, vd, ke, ve = (x.repeat_interleave(G, 1) for x in (kd, vd, ke, ve))  # (L, Hq, D)
    n, L = q.shape[0], k.shape[0]
    qpos = torch.arange(n)[:, None] + causal_offset
    kpos = torch.arange(L)[None, :]
    use = (kpos >= start) & (kpos > qpos - R)  # (n, L)
    scores = torch.where(use, torch.einsum("nhd,lhd->hnl", q.float(), ke),
                         torch.einsum("nhd,lhd->hnl", q.float(), kd)) / D**0.5
    p = torch.softmax(scores.masked_fill(kpos > qpos, float("-inf")), -1)
    return torch.einsum("hnl,lhd->nhd", p * ~use, vd) + torch.einsum("hnl,lhd->nhd",
                                                                      p * use, ve)


@pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8"])
def test_decode_reads_each_sequences_window_from_the_ring(kv_format):
    R, lens = 12, [1, 5, 16, 37, 50]
    starts = [0, 5, 4, 30, 50]  # whole window, none (a ring restarted at the end), parts
    cfg, cache, tables, kvs = build(kv_format, 16, lens, seed=3)
    exact = ring_exact(kvs, R, [(max(s, L - R), L) for s, L in zip(starts, lens, strict=True)])
    exact = exact._replace(start=torch.tensor(starts))
    k_cache, v_cache = cache.layers[0]
    q = torch.randn(len(lens), HKV * 2, D)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens),
                                     cfg.format, exact=exact)
    for s, (k, v) in enumerate(kvs):
        want = windowed_dense(q[s : s + 1], k, v, cfg.format, R, starts[s], lens[s] - 1)
        assert (out[s : s + 1] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_prefill_gives_every_query_its_own_window(kv_format):
    """The ring as it was before the chunk, plus the chunk's own K/V: each query reads
    its R newest keys exact, wherever the chunk starts."""
    R, lens, q_lens = 8, [6, 20, 40, 33], [6, 3, 30, 1]
    starts = [0, 9, 0, 33]  # fresh, a ring from 9, long chunk, no ring (start = L)
    cfg, cache, tables, kvs = build(kv_format, 16, lens, seed=5)
    chunks = [(L - n, L) for L, n in zip(lens, q_lens, strict=True)]
    held = [(max(st, a - R), a) if st < L else (L, L)
            for st, (a, L) in zip(starts, chunks, strict=True)]
    exact = ring_exact(kvs, R, held, new=chunks)._replace(start=torch.tensor(starts))
    cu = torch.tensor([0] + q_lens).cumsum(0)
    q = torch.randn(sum(q_lens), HKV * 2, D)
    k_cache, v_cache = cache.layers[0]
    out = paged_prefill_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens), cu,
                                      cfg.format, exact=exact)
    for s, (k, v) in enumerate(kvs):
        want = windowed_dense(q[cu[s] : cu[s + 1]], k, v, cfg.format, R, starts[s],
                              lens[s] - q_lens[s])
        assert (out[cu[s] : cu[s + 1]] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_decode_kernel_merges_the_ring_like_the_reference(kv_format, num_splits):
    """The fused kernel attends over each sequence's blocks up to its exact window and
    returns its log-sum-exp; the window is attended apart and merged (Triton's interpreter
    on CPU)."""
    R, lens, starts = 12, [1, 5, 16, 37, 50], [0, 5, 4, 0, 43]  # incl. all-exact and none
    cfg, cache, tables, kvs = build(kv_format, 16, lens, seed=4)
    tables = tables.clamp(min=0)
    exact = ring_exact(kvs, R, [(max(s, L - R), L) for s, L in zip(starts, lens, strict=True)])
    exact = exact._replace(start=torch.tensor(starts))
    k_cache, v_cache = cache.layers[0]
    q = torch.randn(len(lens), HKV * 4, D)
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, sl, cfg.format, exact=exact)
    set_backend("triton")
    try:
        out = paged_decode_attention(q, k_cache, v_cache, tables, sl, cfg.format, exact=exact,
                                     num_splits=num_splits)
        with pytest.raises(ValueError, match="exact_window"):  # refused, never ignored
            paged_prefill_attention(q, k_cache, v_cache, tables, sl,
                                    torch.arange(len(lens) + 1, dtype=torch.int32),
                                    cfg.format, exact=exact)
    finally:
        set_backend(None)
    assert (out - ref).abs().max() / ref.abs().max() < 2e-5


# ---- through the engine ----------------------------------------------------------------
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (7, 40, 90)]


def make(llama_dir, fmt, **kw):
    return LLM(llama_dir, kv_format=fmt, kv_memory="4MiB", dtype=torch.float32,
               max_num_batched_tokens=48, **kw)


def test_a_window_longer_than_every_sequence_gives_the_fp16_cache_output(llama_dir):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in make(llama_dir, "fp16").generate(prompts(), params)]
    llm = make(llama_dir, "int4", exact_window=128)
    assert [o.token_ids for o in llm.generate(prompts(), params)] == want
    s = llm.kv_stats()
    assert s["exact_window_tokens"] == 128 and s["exact_window_bytes"] > 0
    assert make(llama_dir, "int4").generate(prompts(), params)[2].token_ids != want[2]


def test_a_wider_window_means_a_smaller_divergence(llama_dir):
    ids = prompts()[2] + prompts()[1]  # 130 tokens
    ref = torch.log_softmax(make(llama_dir, "fp16").score(ids, chunk_size=1), -1)

    def kl(R):
        got = torch.log_softmax(make(llama_dir, "int4", exact_window=R).score(ids, 1), -1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    kls = [kl(R) for R in (0, 8, 32)]
    assert kls[0] > kls[1] > kls[2] > 0


def test_what_a_token_reads_does_not_depend_on_how_the_text_was_chunked(llama_dir):
    """Token by token (decode) and one prefill read the same exact windows, so their
    logits agree to float rounding, far below int4's own error."""
    ids = prompts()[2] + prompts()[1]  # 130 tokens
    llm = make(llama_dir, "int4", exact_window=16)
    by_token, at_once = llm.score(ids, chunk_size=1), llm.score(ids)
    in_chunks = llm.score(ids, chunk_size=37)
    assert (by_token - at_once).abs().max() < 1e-3
    assert (by_token - in_chunks).abs().max() < 1e-3
    plain = make(llama_dir, "int4")  # without a window, int4 differs from fp16 far more
    ref = make(llama_dir, "fp16").score(ids)
    assert (plain.score(ids) - ref).abs().max() > 10 * (by_token - at_once).abs().max()


def test_samples_forked_with_their_rings_equal_separate_requests(llama_dir):
    p = prompts()[1]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    llm = make(llama_dir, "int4", exact_window=16)
    out = llm.generate([p], SamplingParams(**{**params.__dict__, "n": 3}))[0]
    alone = [make(llama_dir, "int4", exact_window=16).generate(
        [p], SamplingParams(**{**params.__dict__, "seed": 3 + j}))[0] for j in range(3)]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone]


def test_bad_exact_window_settings_are_clear_errors(llama_dir):
    with pytest.raises(ValueError, match="fp16 is not quantized"):
        make(llama_dir, "fp16", exact_window=16)
    with pytest.raises(ValueError, match="cannot be combined with eviction"):
        make(llama_dir, "int4", exact_window=16, eviction="streaming")
    with pytest.raises(ValueError, match="exact_window must be"):
        make(llama_dir, "int4", exact_window=-1)
    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv", "fp16",
                                  "--exact-window", "8", "hi"])
    assert r.exit_code == 2 and "not quantized" in r.output


def test_a_released_sequence_loses_its_ring(llama_dir):
    """A parked chat given up under pool pressure must not keep its ring: its next turn
    may rewrite those positions with other tokens (prefix-cache hits land inside)."""
    llm = make(llama_dir, "int4", exact_window=16)
    chat = llm.chat()
    chat.send("Hello there, how are you?", SamplingParams(max_tokens=4, temperature=0.0))
    sid = chat.seq.seq_id
    assert sid in llm.engine.exact_window.rings
    llm.engine.scheduler.release(chat.seq)
    assert sid not in llm.engine.exact_window.rings


def test_more_samples_than_max_num_seqs_keep_their_rings(llama_dir):
    params = SamplingParams(max_tokens=8, temperature=0.0, n=4, ignore_eos=True)
    ps = prompts()[:2]
    want = make(llama_dir, "fp16", max_num_seqs=2).generate(ps, params)
    llm = make(llama_dir, "int4", exact_window=256, max_num_seqs=2)
    got = llm.generate(ps, params)
    assert [[o.token_ids for o in r.outputs] for r in got] == \
        [[o.token_ids for o in r.outputs] for r in want]
    assert llm.engine.exact_window.reclaimed == 0


def test_the_old_name_kv_residual_still_sets_the_exact_window(llama_dir):
    """Scripts written for kv_residual= / --kv-residual keep working, with a notice; both
    names with different values is a one-line error, not a silent choice."""
    with pytest.warns(FutureWarning, match="exact_window"):
        llm = make(llama_dir, "int4", kv_residual=16)
    assert llm.engine.exact_window.tokens == 16
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="old name"):
        make(llama_dir, "int4", exact_window=8, kv_residual=16)
    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv", "fp16",
                                  "--kv-residual", "8", "hi"])
    assert r.exit_code == 2 and "not quantized" in r.output
    assert "--kv-residual is now --exact-window" in r.output
    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv", "int4",
                                  "--exact-window", "8", "--kv-residual", "16", "hi"])
    assert r.exit_code == 2 and "old name of --exact-window" in r.output
