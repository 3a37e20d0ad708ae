"""Quantize-and-write of new K/V on the CPU, in a few ops per layer.

K and V are quantized together by the format's own ``quantize_storage`` (one call over a
head-major (2, Hkv * T, D) tensor already in the storage basis, so the codes are the
format's to the bit; the attention layer rotates q, k and v in one matmul before) and each
stored tensor (codes, scales, zeros of K and of V) takes its rows with one ``index_copy_``
of a contiguous source at the rows planned once per step (cpu_plan.slot_rows), not
through a 3-way advanced index. The codebook format's scale search runs compiled
(cpu_compiled.quantize_codebook: its torch search is ~100x slower).
"""

from __future__ import annotations

import torch

from edgekv.quant import KVFormat, QuantizedKV

from .cpu_compiled import quantize_codebook
from .cpu_plan import slot_rows


def write_kv_cpu(k_store: QuantizedKV, v_store: QuantizedKV, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor, fmt: KVFormat, rows: torch.Tensor | None = None) -> None:
    """Quantize k, v (T, Hkv, D) into one layer's stores at flat ``slots`` (or at the
    planned storage ``rows`` (T * Hkv,) of those slots). Mutates the stores at those slots
    only. The stores must be contiguous (as PagedKVCache allocates them); ``rows`` are
    head-major (cpu_plan.slot_rows)."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    if rows is None:
        rows = slot_rows(slots.to(k_store.data.device), k_store.data.shape[2], Hkv)
    kv = torch.stack([k.transpose(0, 1), v.transpose(0, 1)]).to(k_store.data.device)
    fmt._check_input(kv)  # (2, Hkv, T, D)
    write_kv_storage(k_store, v_store, fmt.to_storage_basis(kv.float()).view(2, Hkv * T, D),
                     rows, fmt)


def write_kv_storage(k_store: QuantizedKV, v_store: QuantizedKV, kv: torch.Tensor,
                     rows: torch.Tensor, fmt: KVFormat) -> None:
    """kv (2, Hkv * T, D) fp32 in the storage basis, K then V, each head-major, stored at
    the planned ``rows`` (Hkv * T,). Mutates the stores at those rows only."""
    q = quantize_codebook(kv, fmt)  # (2, Hkv * T, ...) compiled where it can be
    if q is None:
        q = fmt.quantize_storage(kv)
    for i, store in enumerate((k_store, v_store)):
        for dst, src in ((store.data, q.data), (store.scale, q.scale), (store.zero, q.zero)):
            if dst is None:
                continue
            if dst.dtype == torch.float8_e4m3fn:  # index_copy_ takes its bytes (no fp8 on CPU)
                dst, src = dst.view(torch.uint8), src.view(torch.uint8)
            dst.view(-1, dst.shape[-1]).index_copy_(0, rows, src[i])
