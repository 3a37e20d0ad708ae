"""The residual window (LLM(kv_residual=R)): each sequence's newest tokens kept exact in an
fp16 ring beside the quantized blocks, and read from there by attention."""

import pytest
import torch
from click.testing import CliRunner
from test_reference_attention import HKV, D, build

from edgekv import LLM, SamplingParams
from edgekv.cli import main
from edgekv.kernels import paged_decode_attention_ref, paged_prefill_attention_ref
from edgekv.kernels.dispatch import (
    paged_decode_attention,
    paged_prefill_attention,
    set_backend,
)
from edgekv.kernels.exact_tail import ExactTail
from edgekv.residual import ResidualWindow


# ---- the ring's bookkeeping ------------------------------------------------------------
def window(R=8, slots=4, alive=lambda s: True):
    return ResidualWindow(1, HKV, D, R, "cpu", max_slots=slots, alive=alive)


def test_ring_continues_keeps_the_last_R_and_restarts_on_a_jump():
    w = window(R=8)
    st = w.step([7], [0], [20])  # a 20-token prefill: only its last 8 enter the ring
    assert st.write_index.tolist() == [-1] * 12 + [p % 8 for p in range(12, 20)]
    assert st.num_exact.tolist() == [8]
    st = w.step([7], [20], [21])  # decode continues it
    assert st.num_exact.tolist() == [8] and st.write_index.tolist() == [20 % 8]
    st = w.step([7], [18], [19])  # a rewind to 18: positions 11..18 stay (18 rewritten)
    assert (w.rings[7].start, w.rings[7].end) == (13, 19) and st.num_exact.tolist() == [6]
    st = w.step([7], [40], [41])  # not a continuation (swapped back in): starts over
    assert st.num_exact.tolist() == [1]


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
    assert 1 not in w.rings and w.reclaimed == 1 and st.num_exact.tolist() == [1]
    st = w.step([4, 5, 6], [0, 0, 0], [1, 1, 1])  # more sequences than rings: some read
    assert sorted(st.num_exact.tolist()) == [0, 1, 1]  # the blocks this step


def test_fork_copies_the_parents_ring():
    w = window(R=4)
    st = w.step([1], [0], [3])
    k = torch.randn(3, HKV, D)
    w.write(0, k, -k, st)
    w.fork(1, 2)
    st = w.step([2], [3], [4])
    assert st.num_exact.tolist() == [4]
    ring_k, ring_v = w.layers[0]
    assert torch.equal(ring_k[w.rings[2].slot, :3], k.half())
    assert torch.equal(ring_v[w.rings[2].slot, :3], (-k).half())


# ---- attention reads the ring ----------------------------------------------------------
def exact_tail(kvs, lens, R, num_exact):
    """Rings holding each sequence's newest ``num_exact`` K/V (fp16), slot = sequence."""
    k = torch.zeros(len(kvs), R, HKV, D, dtype=torch.float16)
    v = torch.zeros_like(k)
    for s, ((ks, vs), L, r) in enumerate(zip(kvs, lens, num_exact, strict=True)):
        for c in range(L - r, L):
            k[s, c % R], v[s, c % R] = ks[c].half(), vs[c].half()
    return ExactTail(k, v, torch.arange(len(kvs)), torch.tensor(num_exact))


def mixed_dense(q, k, v, fmt, r, causal_offset):
    """Dense attention over the blocks' values for all but the last r tokens, fp16 for those."""
    kd, vd = fmt.dequantize(fmt.quantize(k)), fmt.dequantize(fmt.quantize(v))
    L = k.shape[0]
    kd[L - r :], vd[L - r :] = k[L - r :].half().float(), v[L - r :].half().float()
    G = q.shape[1] // HKV
    kd, vd = kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kd) / D**0.5
    mask = torch.arange(L)[None, :] > (torch.arange(q.shape[0])[:, None] + causal_offset)
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
    return torch.einsum("hnl,lhd->nhd", p, vd)


@pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8"])
def test_decode_and_prefill_read_the_newest_tokens_from_the_ring(kv_format):
    R, bs = 12, 16
    lens = [1, 5, 16, 37, 50]
    r = [1, 5, 12, 0, 7]  # full, partial and empty windows
    cfg, cache, tables, kvs = build(kv_format, bs, lens, seed=3)
    tail = exact_tail(kvs, lens, R, r)
    k_cache, v_cache = cache.layers[0]
    q = torch.randn(len(lens), HKV * 2, D)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens),
                                     cfg.format, exact=tail)
    q_lens = [1, 3, 16, 4, 9]
    cu = torch.tensor([0] + q_lens).cumsum(0)
    qp = torch.randn(sum(q_lens), HKV * 2, D)
    outp = paged_prefill_attention_ref(qp, k_cache, v_cache, tables, torch.tensor(lens), cu,
                                       cfg.format, exact=tail)
    for s, (k, v) in enumerate(kvs):
        want = mixed_dense(q[s : s + 1], k, v, cfg.format, r[s], lens[s] - 1)
        assert (out[s : s + 1] - want).abs().max() <= 1e-5
        want = mixed_dense(qp[cu[s] : cu[s + 1]], k, v, cfg.format, r[s], lens[s] - q_lens[s])
        assert (outp[cu[s] : cu[s + 1]] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_format", ["int8", "int4"])
def test_decode_kernel_merges_the_ring_like_the_reference(kv_format, num_splits):
    """The fused kernel attends over each sequence's blocks up to its exact tail and
    returns its log-sum-exp; the tail is attended apart and merged (Triton's interpreter
    on CPU)."""
    R, lens, r = 12, [1, 5, 16, 37, 50], [1, 0, 12, 12, 7]  # incl. all-exact and none
    cfg, cache, tables, kvs = build(kv_format, 16, lens, seed=4)
    tables = tables.clamp(min=0)
    tail = exact_tail(kvs, lens, R, r)
    k_cache, v_cache = cache.layers[0]
    q = torch.randn(len(lens), HKV * 4, D)
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, sl, cfg.format, exact=tail)
    set_backend("triton")
    try:
        out = paged_decode_attention(q, k_cache, v_cache, tables, sl, cfg.format, exact=tail,
                                     num_splits=num_splits)
        with pytest.raises(ValueError, match="kv_residual"):  # refused, never ignored
            paged_prefill_attention(q, k_cache, v_cache, tables, sl,
                                    torch.arange(len(lens) + 1, dtype=torch.int32),
                                    cfg.format, exact=tail)
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
    llm = make(llama_dir, "int4", kv_residual=128)
    assert [o.token_ids for o in llm.generate(prompts(), params)] == want
    s = llm.kv_stats()
    assert s["residual_tokens"] == 128 and s["residual_bytes"] > 0
    assert make(llama_dir, "int4").generate(prompts(), params)[2].token_ids != want[2]


def test_a_wider_window_means_a_smaller_divergence(llama_dir):
    ids = prompts()[2] + prompts()[1]  # 130 tokens
    ref = torch.log_softmax(make(llama_dir, "fp16").score(ids, chunk_size=1), -1)

    def kl(R):
        got = torch.log_softmax(make(llama_dir, "int4", kv_residual=R).score(ids, 1), -1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    kls = [kl(R) for R in (0, 8, 32)]
    assert kls[0] > kls[1] > kls[2] > 0


def test_samples_forked_with_their_rings_equal_separate_requests(llama_dir):
    p = prompts()[1]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    llm = make(llama_dir, "int4", kv_residual=16)
    out = llm.generate([p], SamplingParams(**{**params.__dict__, "n": 3}))[0]
    alone = [make(llama_dir, "int4", kv_residual=16).generate(
        [p], SamplingParams(**{**params.__dict__, "seed": 3 + j}))[0] for j in range(3)]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone]


def test_bad_residual_settings_are_clear_errors(llama_dir):
    with pytest.raises(ValueError, match="fp16 is not quantized"):
        make(llama_dir, "fp16", kv_residual=16)
    with pytest.raises(ValueError, match="cannot be combined with eviction"):
        make(llama_dir, "int4", kv_residual=16, eviction="streaming")
    with pytest.raises(ValueError, match="kv_residual must be"):
        make(llama_dir, "int4", kv_residual=-1)
    r = CliRunner().invoke(main, ["generate", "--model", str(llama_dir), "--kv", "fp16",
                                  "--kv-residual", "8", "hi"])
    assert r.exit_code == 2 and "not quantized" in r.output
