"""Paged KV storage: writes land in their slots, copies move codes with scales, accounting."""

import pytest
import torch

from edgekv import BlockManager, CacheConfig, PagedKVCache, parse_memory
from edgekv.kernels import gather_blocks
from edgekv.quant import FORMATS


def make(kv_format="int8", num_blocks=16, block_size=8, layers=2, heads=2, dim=64):
    cfg = CacheConfig(layers, heads, dim, num_blocks, block_size, kv_format)
    return cfg, PagedKVCache(cfg), BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_layout_and_exact_bytes(fmt):
    cfg, cache, _ = make(fmt)
    k_store, _ = cache.layers[0]
    assert k_store.data.shape == (16, 2, 8, cfg.format.packed_dim(64))  # head-major blocks
    assert cache.storage_bytes() == cfg.bytes_total == 16 * 8 * cfg.bytes_per_token


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "fp8"])
def test_written_tokens_read_back_through_the_block_table(fmt):
    cfg, cache, m = make(fmt)
    m.append_slots(7, 3)  # another sequence first, so sequence 0's blocks are not 0, 1, ...
    k, v = torch.randn(2, 19, 2, 64), torch.randn(2, 19, 2, 64)
    slots, _ = m.append_slots(0, 19)
    for layer in range(2):
        cache.write(layer, k[layer], v[layer], torch.tensor(slots))
    ids = torch.tensor(m.block_ids(0))
    for layer in range(2):
        ks, vs = cache.layers[layer]
        got_k = cfg.format.from_storage_basis(gather_blocks(ks, ids, 19, cfg.format))
        got_v = cfg.format.from_storage_basis(gather_blocks(vs, ids, 19, cfg.format))
        want_k = cfg.format.dequantize(cfg.format.quantize(k[layer]))  # (19, 2, 64)
        want_v = cfg.format.dequantize(cfg.format.quantize(v[layer]))
        assert torch.allclose(got_k.transpose(0, 1), want_k, atol=1e-5)
        assert torch.allclose(got_v.transpose(0, 1), want_v, atol=1e-5)


def test_copy_on_write_copies_codes_and_scales_and_isolates_writes():
    cfg, cache, m = make("int4", block_size=8)
    fmt = cfg.format
    k, v = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    slots, _ = m.append_slots(0, 5)
    for layer in range(2):
        cache.write(layer, k, v, torch.tensor(slots))
    m.fork(0, 1)
    new_k = torch.randn(1, 2, 64) * 100  # a very different scale
    slots1, copies = m.append_slots(1, 1)
    cache.copy_blocks(copies)
    for layer in range(2):
        cache.write(layer, new_k, new_k, torch.tensor(slots1))
    for layer in range(2):
        ks, _ = cache.layers[layer]
        parent = gather_blocks(ks, torch.tensor(m.block_ids(0)), 5, fmt)
        child = gather_blocks(ks, torch.tensor(m.block_ids(1)), 6, fmt)
        assert torch.equal(parent, child[:, :5])  # shared history identical in the copy
        assert torch.allclose(fmt.from_storage_basis(child[:, 5]),
                              fmt.dequantize(fmt.quantize(new_k))[0], atol=1e-4)


def test_stats_count_live_tokens_once_and_utilization():
    cfg, cache, m = make("int8", block_size=8)
    m.append_slots(0, 12)  # 2 blocks, 12 live tokens
    m.fork(0, 1)  # shares both: still 12 live tokens in 2 blocks
    s = cache.stats(m)
    assert s["blocks_used"] == 2 and s["live_tokens"] == 12 and s["num_seqs"] == 2
    assert s["utilization"] == pytest.approx(12 / 16)
    assert s["bytes_used"] == 2 * cfg.bytes_per_block
    assert s["bytes_per_token"] == cfg.bytes_per_token
    m.append_slots(1, 1)  # copy-on-write: a third block holding 13 of the child's tokens
    s = cache.stats(m)
    assert s["blocks_used"] == 3 and s["live_tokens"] == 12 + 5


def test_write_rejects_wrong_shapes():
    _, cache, _ = make()
    with pytest.raises(ValueError, match="expected k and v of shape"):
        cache.write(0, torch.randn(3, 4, 64), torch.randn(3, 4, 64), torch.arange(3))


@pytest.mark.parametrize("bs", [0, 4, 12, 512, 16.0])
def test_out_of_range_block_size(bs):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        CacheConfig(2, 2, 64, 8, bs, "int8")


def test_config_rejects_unknown_format_and_bad_head_dim():
    with pytest.raises(ValueError, match="unknown KV format"):
        CacheConfig(2, 2, 64, 8, 16, "int2")
    with pytest.raises(ValueError, match="even"):
        CacheConfig(2, 2, 63, 8, 16, "int4")
    with pytest.raises(ValueError, match="num_blocks"):
        CacheConfig(2, 2, 64, 0, 16, "int8")


def test_memory_budget():
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory(4096) == 4096
    for bad in ("8 gigs", "", "-1GiB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)
    cfg = CacheConfig.for_budget("1MiB", 2, 2, 64, 16, "int4")
    assert cfg.bytes_total <= 2**20 < cfg.bytes_total + cfg.bytes_per_block
    with pytest.raises(ValueError, match="smaller than one int8 block"):
        CacheConfig.for_budget(1000, 2, 2, 64, 16, "int8")
