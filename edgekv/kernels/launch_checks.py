"""Input checks shared by the kernel launchers: shapes, dtypes, devices and strides; and
what every path reads of an attention call alike (``attention_dims``, ``query_rows``,
``observed_queries``: the Triton launchers, the CPU paths and the oracle; no Triton here).

User-facing mistakes (a wrong shape or dtype) raise ``ValueError`` with the expected form;
the kernels' own layout needs (unit stride along the last dim, zero strides equal to scale
strides) are checked here too, so a kernel never reads a layout it was not written for.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from edgekv.quant import KVFormat, QuantizedKV


def check_store(store: QuantizedKV, fmt: KVFormat, head_dim: int, what: str) -> None:
    """One layer's K or V storage matches ``fmt`` and head_dim (see kv_cache.py layout)."""
    data = store.data
    if data.dim() != 4:
        raise ValueError(f"{what}.data must be (num_blocks, Hkv, block_size, packed_dim), "
                         f"got shape {tuple(data.shape)}")
    if data.dtype != fmt.storage_dtype:
        raise ValueError(f"{what}.data has dtype {data.dtype}; {fmt.name} stores "
                         f"{fmt.storage_dtype}")
    if data.shape[3] != fmt.packed_dim(head_dim):
        raise ValueError(f"{what}.data packs {data.shape[3]} elements per vector; {fmt.name} "
                         f"with head_dim {head_dim} packs {fmt.packed_dim(head_dim)}")
    if data.stride(3) != 1:
        raise ValueError(f"{what}.data must be contiguous along its last dim")
    groups = (*data.shape[:3], fmt.num_groups(head_dim))
    for name, t, needed in (("scale", store.scale, fmt.has_scale),
                            ("zero", store.zero, fmt.has_zero)):
        if not needed:
            continue
        if t is None or tuple(t.shape) != groups or t.dtype != fmt.scale_dtype:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(f"{what}.{name} must be {groups} {fmt.scale_dtype} for {fmt.name}, "
                             f"got {got}")
        if t.device != data.device or t.stride(3) != 1:
            raise ValueError(f"{what}.{name} must be on {data.device}, contiguous along "
                             f"its last dim")
    if fmt.has_zero and store.zero.stride() != store.scale.stride():
        raise ValueError(f"{what}.zero must have the same strides as {what}.scale")


def scale_strides(store: QuantizedKV) -> tuple[int, int, int]:
    """(block, head, token) strides of the scale tensor, zeros when there is none."""
    if store.scale is None:
        return 0, 0, 0
    s = store.scale.stride()
    return s[0], s[1], s[2]


def store_args(store: QuantizedKV) -> tuple:
    """The kernels' view of one store: (data, scale, zero, 3 data strides, 3 scale strides).

    An absent scale or zero is passed as ``data`` (a valid pointer the kernel never reads:
    its HAS_SCALE / HAS_ZERO constants are false); e4m3 scales as their uint8 bytes.
    """
    d = store.data
    scale = d if store.scale is None else store.scale
    if scale.dtype == torch.float8_e4m3fn:  # e4m3 scale bytes (the codebook's)
        scale = scale.view(torch.uint8)
    zero = d if store.zero is None else store.zero
    return (d, scale, zero, d.stride(0), d.stride(1), d.stride(2), *scale_strides(store))


def check_paged_inputs(q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                       block_tables: torch.Tensor, seq_lens: torch.Tensor, fmt: KVFormat,
                       num_seqs: int | None = None) -> tuple[int, int]:
    """Validate attention inputs; return (Hkv, block_size).

    q: (T, Hq, D) floating; caches as in ``check_store``; block_tables (S, max_blocks) and
    seq_lens (S,) integer, S = ``num_seqs`` (default T, the decode case).
    """
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a floating (tokens, Hq, head_dim) tensor, got "
                         f"{tuple(q.shape)} {q.dtype}")
    D = q.shape[2]
    check_store(k_cache, fmt, D, "k_cache")
    check_store(v_cache, fmt, D, "v_cache")
    if k_cache.data.shape != v_cache.data.shape:
        raise ValueError(f"k_cache {tuple(k_cache.data.shape)} and v_cache "
                         f"{tuple(v_cache.data.shape)} differ")
    _, Hkv, B, _ = k_cache.data.shape
    if q.shape[1] % Hkv:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({Hkv})")
    S = q.shape[0] if num_seqs is None else num_seqs
    if block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(f"block_tables must be ({S}, max_blocks), got "
                         f"{tuple(block_tables.shape)}")
    if tuple(seq_lens.shape) != (S,):
        raise ValueError(f"seq_lens must be ({S},), got {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")
    devices = {t.device for t in (q, k_cache.data, v_cache.data, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return Hkv, B


def attention_dims(q: torch.Tensor, cache: QuantizedKV,
                   sm_scale: float | None) -> tuple[int, int, int, int, int, int, float]:
    """(N, Hq, D, Hkv, B, G, sm_scale) of attention of ``q`` (N, Hq, D) over one layer's
    paged storage (data (num_blocks, Hkv, B, P)): G = Hq / Hkv query heads per KV head,
    sm_scale D**-0.5 unless given. ValueError when Hq is not a multiple of Hkv."""
    N, Hq, D = q.shape
    Hkv, B = cache.data.shape[1], cache.data.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    return N, Hq, D, Hkv, B, Hq // Hkv, D**-0.5 if sm_scale is None else sm_scale


def query_rows(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
               last_n: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """(s, L_s, q0, q1) for each sequence with new tokens: rows [q0, q1) of the step's T
    queries are its newest (its last ``last_n`` when given; none when last_n <= 0), at
    positions [L_s - (q1 - q0), L_s)."""
    cu = cu_seqlens_q.tolist()
    for s, L in enumerate(seq_lens.tolist()):
        q0, q1 = cu[s], cu[s + 1]
        if q1 == q0:
            continue
        assert 0 < q1 - q0 <= L, f"sequence {s}: {q1 - q0} queries over {L} KV tokens"
        if last_n is not None:
            q0 = max(q0, q1 - last_n)
        if q0 < q1:
            yield s, L, q0, q1


def observed_queries(q: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     last_n: int, fmt: KVFormat) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The block mass's observation windows: (s, L_s, the sequence's last
    min(last_n, q_len_s) queries (n, Hq, D) fp32 in the storage basis)."""
    for s, L, q0, q1 in query_rows(seq_lens, cu_seqlens_q, last_n):
        yield s, L, fmt.to_storage_basis(q[q0:q1].float())
