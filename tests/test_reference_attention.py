"""Reference paged attention == dense fp32 attention over the dequantized K/V."""

import pytest
import torch

from edgekv import BlockManager, CacheConfig, PagedKVCache
from edgekv.kernels import paged_decode_attention_ref, paged_prefill_attention_ref
from edgekv.quant import FORMATS

HKV, D = 2, 64


def build(kv_format, block_size, lens, seed=0):
    """Sequences of the given KV lengths written into shuffled blocks of one layer.

    Returns the cache, padded block tables, and each sequence's original K/V (L, Hkv, D).
    """
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cfg = CacheConfig(1, HKV, D, num_blocks, block_size, kv_format)
    cache, m = PagedKVCache(cfg), BlockManager(num_blocks, block_size)
    # take every block once in a random order, so tables are scattered and non-monotonic
    m.pool.free_ids.clear()
    m.pool.free_ids.extend(torch.randperm(num_blocks, generator=g).tolist())
    kvs = []
    for s, n in enumerate(lens):
        k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        k[..., 5] *= 10  # an outlier channel
        slots, _ = m.append_slots(s, n)
        cache.write(0, k, v, torch.tensor(slots))
        kvs.append((k, v))
    width = max(len(t.block_ids) for t in m.tables.values())
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)  # padding never read
    for s in range(len(lens)):
        ids = m.block_ids(s)
        tables[s, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return cfg, cache, tables, kvs


def dense_attention(q, k, v, fmt, causal_offset):
    """q (n, Hq, D); k, v (L, Hkv, D) original values, dequantized here; plain fp32 math."""
    kd, vd = fmt.dequantize(fmt.quantize(k)), fmt.dequantize(fmt.quantize(v))
    G = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(G, dim=1), vd.repeat_interleave(G, dim=1)  # (L, Hq, D)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kd) / D**0.5
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L)[None, :] > (torch.arange(n)[:, None] + causal_offset)
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
    return torch.einsum("hnl,lhd->nhd", p, vd)


def lengths(bs):
    return [1, bs - 1, bs, 2 * bs, 3 * bs + 5]


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_dense(kv_format, gqa, block_size):
    lens = lengths(block_size)
    cfg, cache, tables, kvs = build(kv_format, block_size, lens)
    q = torch.randn(len(lens), HKV * gqa, D)
    k_cache, v_cache = cache.layers[0]
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens),
                                     cfg.format)
    assert out.shape == q.shape
    for s, (k, v) in enumerate(kvs):
        want = dense_attention(q[s : s + 1], k, v, cfg.format, len(k) - 1)
        assert (out[s : s + 1] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("kv_format", ["fp32", "fp16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_over_history_matches_dense(kv_format, gqa, block_size):
    lens = lengths(block_size)
    q_lens = [1, min(5, lens[1]), block_size, 3, 2 * block_size]  # new tokens per sequence
    cfg, cache, tables, kvs = build(kv_format, block_size, lens, seed=1)
    q = torch.randn(sum(q_lens), HKV * gqa, D)
    cu = torch.tensor([0] + q_lens).cumsum(0)
    k_cache, v_cache = cache.layers[0]
    out = paged_prefill_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens), cu,
                                      cfg.format)
    for s, (k, v) in enumerate(kvs):
        want = dense_attention(q[cu[s] : cu[s + 1]], k, v, cfg.format, len(k) - q_lens[s])
        assert (out[cu[s] : cu[s + 1]] - want).abs().max() <= 1e-5


def test_query_heads_must_be_a_multiple_of_kv_heads():
    cfg, cache, tables, _ = build("fp16", 16, [4])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention_ref(torch.randn(1, 3, D), *cache.layers[0], tables,
                                   torch.tensor([4]), cfg.format)
