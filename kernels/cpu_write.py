"""Quantize-and-write of new K/V on the CPU, in a few ops per layer.

K and V are quantized together by the format's own ``quantize`` (one call over a stacked
(2, T, Hkv, D) tensor, so the codes are the format's to the bit) and each stored tensor
(codes, scales, zeros of K and of V) takes its rows with one ``index_copy_`` at the rows
planned once per step (cpu_plan.slot_rows), not through a 3-way advanced index.
"""

from __future__ import annotations

import torch

from edgekv.quant import KVFormat, QuantizedKV

from .cpu_plan import slot_rows


def write_kv_cpu(k_store: QuantizedKV, v_store: QuantizedKV, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor, fmt: KVFormat, rows: torch.Tensor | None = None) -> None:
    """Quantize k, v (T, Hkv, D) into one layer's stores at flat ``slots`` (or at the
    planned storage ``rows`` (T * Hkv,) of those slots). Mutates the stores at those slots
    only. The stores must be contiguous (as PagedKVCache allocates them)."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    if rows is None:
        rows = slot_rows(slots.to(k_store.data.device), k_store.data.shape[2], Hkv)
    qkv = fmt.quantize(torch.stack([k, v]).to(k_store.data.device))  # (2, T, Hkv, ...)
    for i, store in enumerate((k_store, v_store)):
        for dst, src in ((store.data, qkv.data), (store.scale, qkv.scale),
                         (store.zero, qkv.zero)):
            if dst is not None:
                w = dst.shape[-1]
                dst.view(-1, w).index_copy_(0, rows, src[i].reshape(-1, w).to(dst.dtype))
