"""The compiled CPU decode kernel (kernels/cpu_jit.py) == the oracle, on the same blocks.

Every format it reads x GQA ratio x block size x head_dim over the ragged lengths of
kernel_cases.py (unowned slots NaN-poisoned: a kernel that reads past a sequence's length
fails), with one thread and with the history split across two (flash-decoding's merge).
"""

import pytest
import torch
from kernel_cases import ALL_FORMATS, ragged_lens, random_paged_kv, rel_err

from edgekv.kernels import cpu_compiled, cpu_jit
from edgekv.kernels.cpu_codes import reader_for
from edgekv.kernels.cpu_decode import paged_decode_attention_cpu
from edgekv.kernels.cpu_plan import shared_prefixes
from edgekv.kernels.reference import paged_decode_attention_ref
from edgekv.quant import get_format

pytestmark = pytest.mark.skipif(not cpu_jit.available(), reason="numba is not installed")

HKV = 2
TOL = 2e-5  # the Triton decode tests' tolerance
JIT_FORMATS = [n for n in ALL_FORMATS
               if cpu_compiled.storage_kind(get_format(n), reader_for(get_format(n), 64,
                                                                      "cpu")) is not None]


def test_the_kernel_reads_the_formats_users_pick():
    assert {"fp16", "int8", "int4", "fp8", "fp8_e5m2"} <= set(JIT_FORMATS)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("name", JIT_FORMATS)
def test_compiled_decode_matches_oracle(name, G, B, D, threads, monkeypatch):
    fmt = get_format(name)
    lens = ragged_lens(B) + [40 * B + 3]  # the long one splits across threads
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, device=torch.device("cpu"))
    q = torch.randn(len(lens), HKV * G, D, generator=torch.Generator().manual_seed(0)) * 2
    sl = torch.tensor(lens, dtype=torch.int32)
    calls = []
    real = cpu_jit.decode
    monkeypatch.setattr(cpu_jit, "decode", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    out = paged_decode_attention_cpu(q, k, v, bt, sl, fmt)
    assert calls, "the compiled kernel did not run"
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL


def _share(bt, lens, B):
    """Point sequences 1-3's first 3 blocks at sequence 0's and sequence 5's first 2 at
    sequence 4's (two groups, as a prefix cache shares a system prompt); 6 shares none."""
    bt = bt.clone()
    bt[1:4, :3] = bt[0, :3]
    bt[5, :2] = bt[4, :2]
    return bt


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "fp8", "int4_nl"])
def test_shared_prefixes_read_once_match_oracle(name, G, threads, split, monkeypatch):
    """A batch whose sequences share leading blocks: each group's shared blocks are one
    item for all its queries, merged into each sequence's own part; == the oracle. With
    ``split``, both parts are cut into more items than some ranges have blocks (empty
    items merge as nothing)."""
    if split:
        monkeypatch.setattr(cpu_jit, "num_splits", lambda *a: 3)
        real = cpu_jit._shared
        monkeypatch.setattr(cpu_jit, "_shared", lambda *a: (*real(*a)[:-1], 4))
    fmt, B, D = get_format(name), 16, 64
    lens = [3 * B + 1, 5 * B + 7, 4 * B, 9 * B + 2, 2 * B + 1, 6 * B + 3, 7 * B]
    k, v, bt = random_paged_kv(fmt, lens, HKV, B, D, device=torch.device("cpu"))
    bt = _share(bt, lens, B)
    sl = torch.tensor(lens, dtype=torch.int32)
    shared = shared_prefixes(bt.numpy(), sl.numpy(), B)
    assert shared.count.tolist() == [4, 2] and shared.blocks.tolist() == [3, 2]
    q = torch.randn(len(lens), HKV * G, D, generator=torch.Generator().manual_seed(1)) * 2
    reader = reader_for(fmt, D, "cpu")
    qs = reader.to_codes(q).view(len(lens), HKV, G, D)
    got = cpu_compiled.compiled_decode(qs, k, v, bt, sl, fmt, reader, D**-0.5,
                                       threads=threads, shared=shared)
    alone = cpu_compiled.compiled_decode(qs, k, v, bt, sl, fmt, reader, D**-0.5,
                                         threads=threads)
    ref = paged_decode_attention_ref(q, k, v, bt, sl, fmt)
    assert rel_err(reader.from_codes(got.view(len(lens), HKV * G, D)), ref) < TOL
    assert rel_err(got, alone) < TOL


def test_splits_give_every_thread_work():
    assert cpu_jit.num_splits(1, 256, 1) == 1
    assert cpu_jit.num_splits(16, 256, 2) == 1  # enough items already
    assert cpu_jit.num_splits(1, 256, 2) == 4
    assert cpu_jit.num_splits(1, 20, 2) == 1  # too short to split


def test_switched_off_by_the_environment(monkeypatch):
    fmt = get_format("int8")
    k, v, bt = random_paged_kv(fmt, [5, 17], HKV, 16, 64, device=torch.device("cpu"))
    q = torch.randn(2, HKV, 64)
    monkeypatch.setenv(cpu_compiled.ENV_VAR, "0")
    monkeypatch.setattr(cpu_jit, "decode", lambda *a: pytest.fail("kernel ran"))
    out = paged_decode_attention_cpu(q, k, v, bt, torch.tensor([5, 17], dtype=torch.int32), fmt)
    assert out.shape == q.shape
