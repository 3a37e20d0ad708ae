"""The CPU attention path (the product path on CPU tensors) == the oracle, on the same
quantized blocks.

Full cross product formats x GQA ratio x block size x head_dim, every case holding the
ragged lengths 1, B-1, B and 3B+5 with NaN-poisoned unowned slots (kernel_cases.py): decode
with its block mass, decode reading an exact window, prefill / append, the
same with the exact window, and the prefill block mass, with key tiles forced small so that
every long sequence spans several tiles.
"""

import pytest
import torch
from kernel_cases import ALL_FORMATS, empty_store, ragged_lens, random_paged_kv, rel_err

from edgekv.kernels import cpu_prefill
from edgekv.kernels.cpu_decode import paged_decode_attention_cpu
from edgekv.kernels.cpu_plan import plan_decode, plan_step, slot_rows
from edgekv.kernels.cpu_prefill import paged_prefill_attention_cpu, prefill_block_mass_cpu
from edgekv.kernels.cpu_write import write_kv_cpu
from edgekv.kernels.reference import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_block_mass_ref,
    write_kv_ref,
)
from edgekv.kernels.window_attention import ExactWindowKV
from edgekv.quant import get_format

HKV = 2
DEV = torch.device("cpu")
# The Triton decode tests' tolerance: same codes, only the summation order differs.
TOL = 2e-5
MASS_TOL = dict(atol=1e-5, rtol=1e-4)
TILE_SCORES = cpu_prefill.TILE_SCORES  # the default, before the fixture shrinks it


def _exact(S, R, D, starts, T=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ring = [(torch.randn(S, R, HKV, D, generator=g) * 2).half() for _ in range(2)]
    new = [torch.randn(T, HKV, D, generator=g) * 2 for _ in range(2)] if T else [None, None]
    return ExactWindowKV(ring[0], ring[1], torch.arange(S).flip(0), torch.tensor(starts), *new)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of ~16 keys, so a 3B+5 history spans several."""
    monkeypatch.setattr(cpu_prefill, "TILE_SCORES", 16 * 8 * 40)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_cpu_path_matches_oracle(name, G, B, D):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    # decode: one query per sequence over its whole history
    lens = ragged_lens(B)
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, device=DEV)
    q = torch.randn(len(lens), HKV * G, D, generator=g) * 2
    sl = torch.tensor(lens, dtype=torch.int32)
    ref, ref_mass = paged_decode_attention_ref(q, k, v, bt, sl, fmt, return_block_mass=True)
    out, mass = paged_decode_attention_cpu(q, k, v, bt, sl, fmt, return_block_mass=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL
    torch.testing.assert_close(mass, ref_mass, **MASS_TOL)
    # decode with an exact window: all-exact, none, and partial tails
    exact = _exact(len(lens), 12, D, [0, lens[1], 4, lens[3] - 7])
    ref, ref_mass = paged_decode_attention_ref(q, k, v, bt, sl, fmt, return_block_mass=True,
                                               exact=exact)
    out, mass = paged_decode_attention_cpu(q, k, v, bt, sl, fmt, return_block_mass=True,
                                           exact=exact)
    assert rel_err(out, ref) < TOL
    torch.testing.assert_close(mass, ref_mass, **MASS_TOL)
    # prefill / append: a 1-token prompt, a whole prompt, a short append, a long chunk
    # onto history, a sequence with no queries this step
    runs = [(1, 1), (B - 1, B - 1), (B, 3), (3 * B + 5, 2 * B + 3), (5, 0)]
    lens = [L for L, _ in runs]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=1, device=DEV)
    cu = torch.tensor([0] + [n for _, n in runs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), HKV * G, D, generator=g) * 2
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    assert rel_err(paged_prefill_attention_cpu(q, k, v, bt, sl, cu, fmt), ref) < TOL
    torch.testing.assert_close(prefill_block_mass_cpu(q, k, bt, sl, cu, fmt, last_n=4),
                               prefill_block_mass_ref(q, k, bt, sl, cu, fmt, last_n=4),
                               **MASS_TOL)
    for none in (0, -1):  # no observed query: no mass, on both paths
        assert not prefill_block_mass_cpu(q, k, bt, sl, cu, fmt, last_n=none).any()
        assert not prefill_block_mass_ref(q, k, bt, sl, cu, fmt, last_n=none).any()
    exact = _exact(len(lens), 8, D, [0, 9, 0, 20, 5], T=int(cu[-1]))
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt, exact=exact)
    out = paged_prefill_attention_cpu(q, k, v, bt, sl, cu, fmt, exact=exact)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("name", ["int8", "int4", "fp16"])
def test_length_buckets_pad_no_sequence_to_the_longest(name):
    """Lengths 1..400 make three buckets; each sequence reads only its bucket's length."""
    fmt, B = get_format(name), 16
    lens = [1, 200, 17, 90, 400, 3]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, 64, seed=2, device=DEV)
    buckets = plan_decode(bt, torch.tensor(lens), B, HKV)
    assert len(buckets) == 3
    assert sorted(b.length for b in buckets) == [32, 208, 400]
    q = torch.randn(len(lens), HKV * 4, 64, generator=torch.Generator().manual_seed(3))
    sl = torch.tensor(lens)
    ref, ref_mass = paged_decode_attention_ref(q, k, v, bt, sl, fmt, return_block_mass=True)
    out, mass = paged_decode_attention_cpu(q, k, v, bt, sl, fmt, return_block_mass=True,
                                           buckets=buckets)
    assert rel_err(out, ref) < TOL
    torch.testing.assert_close(mass, ref_mass, **MASS_TOL)


def test_similar_lengths_share_one_bucket():
    bt = torch.arange(40, dtype=torch.int32).view(8, 5)
    (b,) = plan_decode(bt, torch.tensor([60, 64, 70, 75, 33, 66, 80, 71]), 16, HKV)
    assert b.seqs is None and b.length == 80
    assert b.rows.shape == (8 * HKV * 80,) and b.bias.shape == (8 * HKV, 1, 80)


def test_half_precision_queries_keep_their_dtype():
    fmt = get_format("int8")
    k, v, bt = random_paged_kv(fmt, [5, 40], HKV, 16, 64, device=DEV)
    q = torch.randn(2, 8, 64).to(torch.bfloat16)
    sl = torch.tensor([5, 40])
    out = paged_decode_attention_cpu(q, k, v, bt, sl, fmt)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, paged_decode_attention_ref(q, k, v, bt, sl, fmt)) < 1e-2


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_write_stores_the_formats_codes(name):
    """One quantize of K and V together and one index_copy_ per stored tensor: the same
    bytes as the oracle's write, at planned rows or at slots."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(9, HKV, 64, generator=g) * 3 for _ in range(2))
    slots = torch.tensor([0, 5, 17, 18, 31, 40, 41, 62, 63])
    got = [empty_store(fmt, 4, HKV, 16, 64, device=DEV) for _ in range(2)]
    got2 = [empty_store(fmt, 4, HKV, 16, 64, device=DEV) for _ in range(2)]
    want = [empty_store(fmt, 4, HKV, 16, 64, device=DEV) for _ in range(2)]
    write_kv_cpu(got[0], got[1], k, v, slots, fmt, rows=slot_rows(slots, 16, HKV))
    write_kv_cpu(got2[0], got2[1], k, v, slots, fmt)
    write_kv_ref(want[0], want[1], k, v, slots, fmt)
    for a, a2, b in zip(got, got2, want, strict=True):
        for x, x2, y in zip((a.data, a.scale, a.zero), (a2.data, a2.scale, a2.zero),
                            (b.data, b.scale, b.zero), strict=True):
            if y is not None:
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                assert torch.equal(x2.view(torch.uint8), y.view(torch.uint8))


@pytest.mark.parametrize("name", ["int8", "int4", "fp16"])
def test_prefill_reads_a_shared_prefix_once_for_its_group(monkeypatch, name):
    """Requests of one step whose histories start with the same blocks (a cached system
    prompt): the shared blocks are read once for the group, every sequence's chunk
    attends them in one call and the rest of its own history after; == the oracle."""
    if cpu_prefill._FLASH is None:
        pytest.skip("torch has no fused CPU flash attention")
    B, D, G = 16, 64, 4
    reads = []
    real = cpu_prefill._read
    monkeypatch.setattr(cpu_prefill, "_read",
                        lambda st, tb, t0, t1, f: reads.append((t0, t1)) or real(st, tb, t0, t1, f))
    fmt = get_format(name)
    # (history + chunk): three share 4 blocks, one of them with more history of its own;
    # one shares only a block; one is a whole prompt (no history)
    runs = [(4 * B + 9, 6), (6 * B + 2, B + 3), (4 * B + 1, 1), (3 * B, 5), (B + 4, B + 4)]
    lens = [L for L, _ in runs]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=6, device=DEV)
    bt = bt.clone()
    bt[1:3, :4] = bt[0, :4]
    bt[3, :1] = bt[0, :1]
    cu = torch.tensor([0] + [n for _, n in runs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), HKV * G, D, generator=torch.Generator().manual_seed(7))
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    assert rel_err(paged_prefill_attention_cpu(q, k, v, bt, sl, cu, fmt), ref) < TOL
    # the shared 4 blocks read once (K and V), then each member from there on
    assert reads.count((0, 4 * B)) == 2 and (4 * B, 6 * B + 2 - (B + 3)) in reads
    assert reads.count((0, 3 * B - 5)) == 2  # sequence 3 shares one block: read alone


def test_plan_rows_address_every_layer_alike():
    """slot -> row is the storage index of (block, head, offset)."""
    slots = torch.tensor([3, 16 * 5 + 9])
    rows = slot_rows(slots, 16, 3).view(3, 2)  # head-major
    store = torch.arange(7 * 3 * 16).view(7, 3, 16)  # (blocks, Hkv, B): value = flat row
    assert torch.equal(rows[:, 0], store[0, :, 3]) and torch.equal(rows[:, 1], store[5, :, 9])
    plan = plan_step(torch.zeros(2, 1, dtype=torch.int32), torch.tensor([4, 7]), slots, 3,
                     16, 3)
    assert plan.buckets == () and torch.equal(plan.write_rows, rows.reshape(-1))


def test_prefill_memory_grows_with_the_tile_not_the_history(monkeypatch):
    """The score tile is capped (16 MiB of fp32 scores at Llama-3.1-8B's 32 query heads and
    a 512-token chunk, whatever the history): a long history is read in more tiles, not
    bigger ones, and the result does not depend on the tile."""
    monkeypatch.setattr(cpu_prefill, "TILE_SCORES", TILE_SCORES)
    assert cpu_prefill._tile_len(32, 512, 16) * 32 * 512 * 4 <= 16 * 2**20
    Hq, n, B = 8, 2, 16
    monkeypatch.setattr(cpu_prefill, "TILE_SCORES", Hq * n * 2 * B)  # two blocks a tile
    fmt = get_format("int4")
    L = 40 * B + 3
    k, v, bt = random_paged_kv(fmt, [L], HKV, B, 64, seed=4, device=DEV)
    q = torch.randn(n, Hq, 64, generator=torch.Generator().manual_seed(5))
    sl, cu = torch.tensor([L]), torch.tensor([0, n])
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    assert rel_err(paged_prefill_attention_cpu(q, k, v, bt, sl, cu, fmt), ref) < TOL


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("name", ["int8", "int4", "fp16"])
def test_prefill_reads_the_history_in_bounded_segments(monkeypatch, name, flash):
    """Without an exact window, prefill runs torch's fused flash attention over segments
    of at most SEGMENT_BYTES of K + V (here two blocks), merged by log-sum-exp; without
    that op (older torch), the key tiles. Either equals the oracle."""
    B, D, G = 16, 64, 4
    monkeypatch.setattr(cpu_prefill, "SEGMENT_BYTES", 2 * B * HKV * D * 8)
    if not flash:
        monkeypatch.setattr(cpu_prefill, "_FLASH", None)
    reads = []
    real = cpu_prefill._read
    monkeypatch.setattr(cpu_prefill, "_read",
                        lambda st, tb, t0, t1, f: reads.append(t1 - t0) or real(st, tb, t0, t1, f))
    fmt = get_format(name)
    runs = [(20 * B + 3, 2 * B + 5), (B, B), (7, 1)]  # history + chunk, a whole prompt, decode
    lens = [L for L, _ in runs]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, seed=2, device=DEV)
    cu = torch.tensor([0] + [n for _, n in runs]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), HKV * G, D, generator=torch.Generator().manual_seed(3))
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_prefill_attention_ref(q, k, v, bt, sl, cu, fmt)
    assert rel_err(paged_prefill_attention_cpu(q, k, v, bt, sl, cu, fmt), ref) < TOL
    if flash:  # K and V: history segments of at most two blocks, then each chunk
        assert sum(reads) == 2 * sum(lens)  # every key read once, K and V
        assert [r for r in reads if r > 2 * B] == [2 * B + 5] * 2  # only a long chunk
