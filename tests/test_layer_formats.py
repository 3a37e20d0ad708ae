"""One KV format per layer: the config's bytes, each layer's storage, attention over a
mixed cache against the oracle and against each layer's uniform cache, sessions and
prefix sharing over mixed caches."""

from __future__ import annotations

import pytest
import torch

from edgekv import LLM, CacheConfig, PagedKVCache, SamplingParams
from edgekv.config import layer_formats
from edgekv.eval.layers import capture
from edgekv.kernels.dispatch import set_backend
from edgekv.quant import get_format
from edgekv.session.io import load_session, save_session

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
MIXED = "int8,int4"  # the tiny models have two layers


def test_config_sums_the_layers_bytes_and_keeps_a_canonical_name():
    c = CacheConfig(3, 2, 64, 10, 16, "int8, int4 ,fp16")
    per = [get_format(f).bytes_per_token(2, 64) for f in ("int8", "int4", "fp16")]
    assert c.kv_format == "int8,int4,fp16" and c.mixed
    assert c.bytes_per_token == sum(per) and c.bytes_per_block == 16 * sum(per)
    assert [f.name for f in c.formats] == ["int8", "int4", "fp16"]
    with pytest.raises(ValueError, match="differs by layer"):
        c.format  # noqa: B018
    same = CacheConfig(3, 2, 64, 10, 16, "int4,int4,int4")
    assert same.kv_format == "int4" and not same.mixed and same.format.name == "int4"
    cache = PagedKVCache(c)
    assert [s.data.dtype for s, _ in cache.layers] == [torch.int8, torch.uint8, torch.float16]
    assert cache.storage_bytes() == c.bytes_total
    budget = CacheConfig.for_budget(c.bytes_per_block * 7 + 5, 3, 2, 64, 16, "int8,int4,fp16")
    assert budget.num_blocks == 7


@pytest.mark.parametrize("bad, match", [("int8,int4", "2 formats for 3 layers"),
                                        ("int8,int5,int8", "unknown KV format")])
def test_a_bad_per_layer_format_is_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(3, 2, 64, 10, 16, bad)
    with pytest.raises(ValueError, match=match):
        layer_formats(bad, 3)


def test_llm_refuses_a_wrong_count_before_serving(llama_dir):
    with pytest.raises(ValueError, match="3 formats for 2 layers"):
        LLM(llama_dir, kv_format="int8,int4,int4", kv_memory="1MiB")


@pytest.fixture(scope="module")
def mixed(llama_dir):
    return LLM(llama_dir, kv_format=["int8", "int4"], kv_memory="1MiB", dtype="float32")


def test_each_layer_reads_its_own_format(llama_dir, mixed):
    """Fed the same input, layer l of the mixed cache returns what layer l of a uniform
    cache in layer l's format returns: the formats do not leak across layers."""
    ids = list(range(3, 60))
    ref_in, _ = capture(LLM(llama_dir, kv_format="fp32", kv_memory="1MiB"), ids)
    _, outs = capture(mixed, ids, ref_in)
    for layer, fmt in enumerate(MIXED.split(",")):
        uniform = LLM(llama_dir, kv_format=fmt, kv_memory="1MiB", dtype="float32")
        _, want = capture(uniform, ids, ref_in)
        torch.testing.assert_close(outs[layer], want[layer], rtol=1e-5, atol=1e-5)
    _, other = capture(LLM(llama_dir, kv_format="int4", kv_memory="1MiB"), ids, ref_in)
    assert not torch.allclose(outs[0], other[0], atol=1e-4)  # layer 0 is int8, not int4


@pytest.mark.parametrize("chunk", [None, 1], ids=["prefill", "decode"])
def test_mixed_cache_equals_the_oracle(mixed, chunk):
    """The CPU product paths (the compiled decode layer per layer kind; the torch prefill)
    read a mixed cache as the reference attention does."""
    ids = list(range(5, 45))
    got = mixed.score(ids, chunk_size=chunk)
    set_backend("reference")
    try:
        want = mixed.score(ids, chunk_size=chunk)
    finally:
        set_backend(None)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    mixed.check_integrity()


def test_sessions_round_trip_a_mixed_cache(llama_dir, mixed, tmp_path):
    chat = mixed.chat(system="Be brief.")
    chat.send("Hello there", GREEDY)
    save_session(chat, tmp_path / "s.safetensors")
    next_reply = chat.send("And then?", GREEDY)
    other = LLM(llama_dir, kv_format=MIXED, kv_memory="1MiB", dtype="float32").chat()
    load_session(other, tmp_path / "s.safetensors")
    assert other.send("And then?", GREEDY) == next_reply
    other.llm.check_integrity()
    uniform = LLM(llama_dir, kv_format="int8", kv_memory="1MiB", dtype="float32").chat()
    with pytest.raises(ValueError, match="kv_format"):
        load_session(uniform, tmp_path / "s.safetensors")
    uniform.llm.check_integrity()


def test_prefix_hits_and_samples_share_mixed_blocks(mixed):
    prompt = list(range(7, 7 + 48))  # three full blocks
    first = mixed.generate([prompt], GREEDY)[0]
    hits = mixed.kv_stats()["prefix_hit_tokens"]
    again = mixed.generate([prompt], GREEDY)[0]
    assert mixed.kv_stats()["prefix_hit_tokens"] > hits
    assert again.token_ids == first.token_ids
    params = SamplingParams(max_tokens=8, temperature=0.9, n=3, seed=1, ignore_eos=True)
    out = mixed.generate([prompt], params)[0]
    assert len(out.outputs) == 3
    mixed.check_integrity()


def test_triton_kernels_read_each_layer_in_its_format(llama_dir, mixed):
    """The fused kernels (Triton's interpreter on CPU) get each layer's format: fed the
    same input, layer l of the mixed cache returns what a uniform cache of l's format
    returns through the same kernels. (Against the oracle, Triton's write rounds a few
    codes the other way in any int4 cache, mixed or not; the kernel tests cover that.)"""
    ids = list(range(11, 31))
    ref_in, _ = capture(LLM(llama_dir, kv_format="fp32", kv_memory="1MiB"), ids)
    set_backend("triton")
    try:
        _, outs = capture(mixed, ids, ref_in)
        for layer, fmt in enumerate(MIXED.split(",")):
            uniform = LLM(llama_dir, kv_format=fmt, kv_memory="1MiB", dtype="float32")
            _, want = capture(uniform, ids, ref_in)
            torch.testing.assert_close(outs[layer], want[layer], rtol=1e-5, atol=1e-5)
        decoded = mixed.score(ids[:5], chunk_size=1)
    finally:
        set_backend(None)
    set_backend("reference")
    try:
        want = mixed.score(ids[:5], chunk_size=1)
    finally:
        set_backend(None)
    # the decode kernel: within Triton's int4 rounding of the oracle (~0.03 on these
    # logits, the same for a uniform int4 cache); a layer read in another format is O(1) off
    torch.testing.assert_close(decoded, want, rtol=0, atol=0.06)
    mixed.check_integrity()
