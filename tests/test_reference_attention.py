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


def dense_block_mass(q, k, fmt, causal_offset, block_size, last_n):
    """Block mass of the last ``last_n`` queries, from plain dense attention: (nb,)."""
    kd = fmt.dequantize(fmt.quantize(k)).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n, L = q.shape[0], k.shape[0]
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kd) / D**0.5
    mask = torch.arange(L)[None, :] > (torch.arange(n)[:, None] + causal_offset)
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)[:, n - last_n :]
    per_token = p.sum((0, 1))  # (L,)
    nb = -(-L // block_size)
    return torch.nn.functional.pad(per_token, (0, nb * block_size - L)).view(nb, -1).sum(1)


@pytest.mark.parametrize("kv_format", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("last_n", [1, 3, 64])
def test_prefill_block_mass_matches_dense(kv_format, last_n):
    from edgekv.kernels import prefill_block_mass_ref

    bs, gqa = 16, 4
    lens = lengths(bs)
    cfg, cache, tables, kvs = build(kv_format, bs, lens, seed=3)
    fmt = cfg.format
    nq = [min(n, 5) for n in lens]
    q = torch.randn(sum(nq), HKV * gqa, D)
    cu = torch.tensor([0] + nq).cumsum(0).to(torch.int32)
    k_store, _ = cache.layers[0]
    mass = prefill_block_mass_ref(q, k_store, tables, torch.tensor(lens), cu, fmt,
                                  last_n=last_n)
    for s, (n, (k, _)) in enumerate(zip(lens, kvs, strict=True)):
        qs = q[cu[s] : cu[s + 1]]
        want = dense_block_mass(qs, k, fmt, n - nq[s], bs, min(last_n, nq[s]))
        torch.testing.assert_close(mass[s, : len(want)], want, atol=1e-4, rtol=1e-4)
        assert mass[s, len(want) :].abs().sum() == 0
        assert mass[s].sum().item() == pytest.approx(min(last_n, nq[s]) * HKV * gqa, rel=1e-5)


@pytest.mark.parametrize("kv_format", ["fp16", "int4"])
def test_decode_returns_block_mass_from_the_same_pass(kv_format):
    from edgekv.kernels import decode_block_mass_ref

    bs = 16
    lens = lengths(bs)
    cfg, cache, tables, _ = build(kv_format, bs, lens, seed=4)
    q = torch.randn(len(lens), HKV * 4, D)
    k_store, v_store = cache.layers[0]
    sl = torch.tensor(lens)
    out, mass = paged_decode_attention_ref(q, k_store, v_store, tables, sl, cfg.format,
                                           return_block_mass=True)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_store, v_store, tables, sl,
                                                               cfg.format))
    torch.testing.assert_close(mass, decode_block_mass_ref(q, k_store, tables, sl, cfg.format),
                               atol=1e-5, rtol=1e-5)
