"""Shared builders for the kernel tests: random paged, quantized KV laid out like the cache.

Blocks are taken in a shuffled order (tables are non-contiguous and non-monotonic), every
slot holds real quantized data, and the slots no sequence owns are *poisoned*: NaN in
float codes, scales and zeros, NaN fp8 codes (0x7F). A kernel that reads past a
sequence's end without masking (data, scales or zeros) then returns NaN.
"""

from __future__ import annotations

import torch

from edgekv.quant import FORMATS, VARIANTS, KVFormat, QuantizedKV, get_format

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_FORMATS = FORMATS + VARIANTS  # every one runs in the Triton kernels too
PAD_BLOCK_ID = 1 << 30  # block-table padding: never a valid id, so never to be read


def ragged_lens(block_size: int) -> list[int]:
    """One batch covering 1 token, a partial block, a full block, several + a partial."""
    return [1, block_size - 1, block_size, 3 * block_size + 5]


def empty_store(fmt: KVFormat, num_blocks: int, hkv: int, block_size: int, head_dim: int,
                device=DEVICE) -> QuantizedKV:
    shape = (num_blocks, hkv, block_size)
    data = torch.zeros(*shape, fmt.packed_dim(head_dim), dtype=fmt.storage_dtype, device=device)
    groups = (*shape, fmt.num_groups(head_dim))
    scale = torch.ones(groups, dtype=fmt.scale_dtype, device=device) if fmt.has_scale else None
    zero = torch.zeros(groups, dtype=fmt.scale_dtype, device=device) if fmt.has_zero else None
    return QuantizedKV(data, scale, zero)


def _poison(store: QuantizedKV, fmt: KVFormat, blk: torch.Tensor, off: torch.Tensor) -> None:
    """Write NaN-producing values into slots (blk[i], :, off[i])."""
    if store.data.is_floating_point():
        store.data[blk, :, off] = float("nan")
    elif fmt.name.startswith("fp8"):
        store.data[blk, :, off] = 0x7F  # NaN in e4m3fn and in e5m2
    for t in (store.scale, store.zero):
        if t is not None:
            t[blk, :, off] = float("nan")


def random_paged_kv(fmt: KVFormat | str, lens: list[int], hkv: int, block_size: int,
                    head_dim: int, seed: int = 0, spare_blocks: int = 3, device=DEVICE):
    """K and V caches holding ``lens[s]`` tokens for sequence s, and their block tables.

    Returns (k_cache, v_cache, block_tables (S, max_blocks) int32). Values are N(0.3, 2)
    with an outlier channel in K, quantized by ``fmt.quantize`` (so kernels and reference
    read the same codes).
    """
    fmt = get_format(fmt)
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens), max(max(need), 1)), PAD_BLOCK_ID, dtype=torch.int32)
    caches = []
    for which in range(2):
        x = torch.randn(num_blocks, hkv, block_size, head_dim, generator=g) * 2 + 0.3
        if which == 0:
            x[..., 3] *= 8  # an outlier key channel
        q = fmt.quantize(x.to(device))
        caches.append(QuantizedKV(q.data.contiguous(), q.scale, q.zero))
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    i = 0
    for s, (n, nb) in enumerate(zip(lens, need, strict=True)):
        tables[s, :nb] = order[i:i + nb].to(torch.int32)
        pos = torch.arange(n)
        used[tables[s, pos // block_size].long(), pos % block_size] = True
        i += nb
    blk, off = torch.nonzero(~used, as_tuple=True)
    for c in caches:
        _poison(c, fmt, blk.to(device), off.to(device))
    return caches[0], caches[1], tables.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over the output scale max |ref| (NaN anywhere -> inf)."""
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
