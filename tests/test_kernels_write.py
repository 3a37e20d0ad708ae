"""Fused quantize-and-write kernel == ``fmt.quantize`` + index assignment (write_kv_ref).

Codes may differ by one step where a value sits on a rounding boundary and the device
computes differently (measured: identical under the interpreter); scales and zeros to
1e-3 relative. The codebook (int4_nl) must write the format's codes and scales, except in a
group whose candidate scales nearly tie: there the kernel's choice may differ if its error
is within 1e-5 relative of the least (the kernel sums the error in another order). Every
format runs with two (block size, head_dim) pairs; the inputs include the edge cases of
the formats' math (zero and constant vectors, tiny and huge values).
"""

import pytest
import torch
from kernel_cases import ALL_FORMATS, DEVICE, empty_store

from edgekv.kernels.quant_write import quant_write, write_kv_triton
from edgekv.kernels.reference import write_kv_ref
from edgekv.quant import CodebookFormat, QuantizedKV, get_format, unpack_int4

HKV = 2
CASES = [(name, *bd) for name in ALL_FORMATS for bd in ((16, 64), (32, 128))]
CASES += [(name, 16, 96) for name in ("bf16", "int8", "fp8", "int4")]  # padded halves
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _codes(store: QuantizedKV, fmt) -> torch.Tensor:
    """Integer codes per channel: unpacked nibbles, or the storage bits as integers (one
    step of the code = one unit, also for float storage: one ulp)."""
    data = store.data
    if getattr(fmt, "bits", None) == 4:
        return unpack_int4(data).int()
    if data.dtype == torch.int8:
        return data.int()
    return data.view(_INT_VIEW[data.element_size()]).int()


def _inputs(T, D, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, HKV, D, generator=g) * 3
    v = torch.randn(T, HKV, D, generator=g) + 1
    k[0] = 0.0  # zero vector: the smallest scale, all codes 0
    v[1] = 0.7  # constant vector: asymmetric range 0
    k[2, 0] *= 1e-6  # tiny values
    v[3, 1, :5] = 3e5  # past fp16's range: float formats clamp
    k[4, :, 7] = 40.0  # one outlier channel
    return k.to(DEVICE), v.to(DEVICE)


def _compare(got: QuantizedKV, want: QuantizedKV, fmt):
    assert (_codes(got, fmt) - _codes(want, fmt)).abs().max() <= 1
    for a, b in ((got.scale, want.scale), (got.zero, want.zero)):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=0)


def _compare_codebook(got: QuantizedKV, want: QuantizedKV, fmt: CodebookFormat,
                      x: torch.Tensor, slots: torch.Tensor):
    """Per written group (x (T, Hkv, D) at ``slots``): the format's codes and scale, or,
    where they differ, a squared error within 1e-5 relative of the format's (the least of
    its candidates)."""
    B, G = got.data.shape[2], got.scale.shape[-1]
    blk, off = slots // B, slots % B
    xs = fmt.to_storage_basis(x.float())  # (T, Hkv, D)
    codes, scales, errs = [], [], []
    for store in (got, want):
        q = QuantizedKV(store.data[blk, :, off], store.scale[blk, :, off])  # token-major
        c = unpack_int4(q.data)  # (T, Hkv, D)
        codes.append(c.reshape(*c.shape[:-1], G, -1))
        scales.append(q.scale)  # (T, Hkv, G)
        r = (fmt.decode(q) - xs).square()
        errs.append(r.reshape(*r.shape[:-1], G, -1).sum(-1))  # (T, Hkv, G)
    same = (codes[0] == codes[1]).all(-1) & (scales[0] == scales[1])
    assert ((errs[0] - errs[1]).abs() <= 1e-5 * errs[1])[~same].all()
    rest = torch.ones(got.data.shape[0], B, dtype=torch.bool, device=slots.device)
    rest[blk, off] = False  # the slots not written: as they were
    for a, b in ((got.data, want.data),
                 (got.scale.view(torch.uint8), want.scale.view(torch.uint8))):
        assert torch.equal(a.transpose(1, 2)[rest], b.transpose(1, 2)[rest])


@pytest.mark.parametrize("name,B,D", CASES)
def test_write_matches_quantize(name, B, D):
    fmt = get_format(name)
    nb, T = 6, 37  # tokens land in random slots of random blocks, some blocks untouched
    if isinstance(fmt, CodebookFormat) and DEVICE.type == "cpu":
        T = 16  # one program per head: the interpreter takes ~7 s a program for its 64
        # candidate scales (test_write_is_exact_on_cpu_interpreter runs two, with a tail)
    k, v = _inputs(T, D, seed=B + D)
    slots = torch.randperm(nb * B, generator=torch.Generator().manual_seed(1))[:T].to(DEVICE)
    # 1. reference: fmt.quantize + index assignment, as PagedKVCache.write
    want = [empty_store(fmt, nb, HKV, B, D) for _ in range(2)]
    write_kv_ref(want[0], want[1], k, v, slots, fmt)
    # 2. triton
    got = [empty_store(fmt, nb, HKV, B, D) for _ in range(2)]
    write_kv_triton(got[0], got[1], k, v, slots, fmt)
    # 3. compare, written and untouched slots alike
    for g, w, x in zip(got, want, (k, v), strict=True):
        if isinstance(fmt, CodebookFormat):
            _compare_codebook(g, w, fmt, x, slots)
        else:
            _compare(g, w, fmt)


def test_write_is_exact_on_cpu_interpreter():
    """Same math, same fp32 operations: bit-identical codes, scales and zeros here."""
    if DEVICE.type != "cpu":
        pytest.skip("GPU division and rounding may differ by one code; checked above")
    for name in ALL_FORMATS:
        fmt = get_format(name)
        k, v = _inputs(21, 64, seed=7)
        slots = torch.arange(21) * 3 % 64
        want = [empty_store(fmt, 4, HKV, 16, 64) for _ in range(2)]
        got = [empty_store(fmt, 4, HKV, 16, 64) for _ in range(2)]
        write_kv_ref(want[0], want[1], k, v, slots, fmt)
        write_kv_triton(got[0], got[1], k, v, slots, fmt)
        for g, w in zip(got, want, strict=True):
            for a, b in ((g.data, w.data), (g.scale, w.scale), (g.zero, w.zero)):
                assert b is None or torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


def test_negative_slots_are_skipped_and_strided_inputs_work():
    fmt = get_format("int4_norot")  # no rotation: the kernel reads the strided input's copy
    k, _ = _inputs(8, 64, seed=3)
    k_strided = torch.cat([k, k], dim=-1)[..., ::2]  # last-dim stride 2: launcher copies
    slots = torch.tensor([5, -1, 7, 8, -1, 9, 10, 40], device=DEVICE)
    got, want = empty_store(fmt, 4, HKV, 16, 64), empty_store(fmt, 4, HKV, 16, 64)
    quant_write(got, k_strided, slots, fmt)
    keep = slots >= 0
    write_kv_ref(want, empty_store(fmt, 4, HKV, 16, 64), k_strided[keep], k[keep],
                 slots[keep], fmt)
    _compare(got, want, fmt)


def test_write_rejects_wrong_shapes():
    fmt = get_format("int8")
    store = empty_store(fmt, 4, HKV, 16, 64)
    with pytest.raises(ValueError):
        quant_write(store, torch.zeros(3, HKV + 1, 64, device=DEVICE), torch.arange(3), fmt)
    with pytest.raises(ValueError):
        quant_write(store, torch.zeros(3, HKV, 64, device=DEVICE), torch.arange(4), fmt)
