"""Routing a CPU decode call to the compiled kernel (cpu_jit.py) when it can take it.

The compiled kernel reads int8, int4 (per token-head scales), fp8, fp16 and the 4-bit
codebook (scales per group) storage; the plain-torch path (cpu_decode.py) keeps everything
else (bf16, fp32, grouped integer scales), the
block mass and the exact window. ``EDGEKV_CPU_JIT=0`` switches the kernel off.
Where numba is missing or fails, cpu_jit logs one warning and this returns None.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np
import torch

from edgekv.quant import CodebookFormat, KVFormat, QuantizedKV
from edgekv.quant.hadamard import hadamard_block_size

from . import cpu_jit
from .cpu_codes import CodeReader
from .cpu_plan import JitStep

ENV_VAR = "EDGEKV_CPU_JIT"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


def storage_kind(fmt: KVFormat, reader: CodeReader) -> tuple[int, int, np.ndarray] | None:
    """(kind, int4 offset, byte table) of a format's stored rows, None when the kernel
    cannot read them."""
    dt = fmt.storage_dtype
    if isinstance(fmt, CodebookFormat):
        return (cpu_jit.KIND_CODEBOOK, 0, codebook_table(fmt)) \
            if _jit_codebook(fmt, reader.head_dim) else None
    if reader.token_scale:
        if reader.int4_offset is not None:
            return cpu_jit.KIND_INT4, reader.int4_offset, _NO_TABLE
        if dt == torch.int8:
            return cpu_jit.KIND_INT8, 0, _NO_TABLE
        if dt == torch.uint8 and getattr(fmt, "fp8_dtype", None) is not None:
            return cpu_jit.KIND_BYTE_LUT, 0, cpu_jit.byte_table(fmt.fp8_dtype)
        return None
    if not fmt.has_scale and dt == torch.float16:
        return cpu_jit.KIND_FP16, 0, _NO_TABLE
    return None


_NO_TABLE = cpu_jit._NO_TABLE


def _jit_codebook(fmt: CodebookFormat, head_dim: int | None) -> bool:
    """The compiled kernels read e4m3 group scales as uint16 pairs (_bits): an even
    number of groups per row; and codes 16 at a time (cpu_jit_lut), from one group each:
    groups of a multiple of 16 values."""
    return fmt.scale_dtype == torch.float8_e4m3fn and fmt.group_size is not None and (
        fmt.group_size % 16 == 0) and (head_dim is None or (head_dim // fmt.group_size) % 2 == 0)


@functools.lru_cache(maxsize=8)
def codebook_table(fmt: CodebookFormat) -> np.ndarray:
    """(292 + factors,) fp32: the 16 levels, the 15 midpoints between them, the level
    polynomial's 5 coefficients, the values of the 256 e4m3 bytes (scales), the candidate
    scale factors (cpu_jit_loops' kind 4)."""
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return torch.cat([fmt.level_tensor(), fmt.midpoints(), torch.tensor(fmt.poly),
                      e4m3.float(), torch.tensor(fmt.factors)]).float().numpy()


def quantize_codebook(kv: torch.Tensor, fmt: KVFormat) -> QuantizedKV | None:
    """kv (..., D) fp32 CPU, in the storage basis -> the codebook format's storage, written
    by the compiled kernel (fmt.quantize_storage's codes; a group whose two best candidates
    tie to the last bits may take the other), or None where the kernel does not take it
    (another format, the kernels off or failing)."""
    if not isinstance(fmt, CodebookFormat) or kv.device.type != "cpu" or not enabled():
        return None
    D = kv.shape[-1]
    if kv.numel() == 0 or not _jit_codebook(fmt, D) or not cpu_jit.available():
        return None
    x = kv.reshape(-1, D).float().contiguous().numpy()
    out = cpu_jit.write_codebook_rows(x, fmt.num_groups(D), codebook_table(fmt),
                                      torch.get_num_threads())
    if out is None:
        return None
    lead = kv.shape[:-1]
    return QuantizedKV(data=torch.from_numpy(out[0]).view(*lead, D // 2),
                       scale=torch.from_numpy(out[1]).view(torch.float8_e4m3fn).view(
                           *lead, -1), zero=None)


_NONE16 = np.zeros((0, 0, 0), np.uint16)


def _bits(t: torch.Tensor | None) -> np.ndarray:
    """(num_blocks, Hkv, B, groups) fp16 scales / zeros -> (num_blocks, Hkv, B x groups)
    uint16 bits; e4m3 scales -> (num_blocks, Hkv, B x groups / 2) uint16 pairs of bytes
    (one compiled type for both); no copy (an empty array for None)."""
    if t is None:
        return _NONE16
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().reshape(*t.shape[:2], -1).view(np.uint16)
    return t.view(torch.int16).numpy().view(np.uint16).reshape(*t.shape[:2], -1)


def _views(store: QuantizedKV) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data as bytes, scale bits, zero bits) of one layer's store, made once per store
    (kept on it: the store's tensors never change for its lifetime)."""
    views = store.__dict__.get("_cpu_jit_views")
    if views is None:
        views = (store.data.numpy().view(np.uint8), _bits(store.scale), _bits(store.zero))
        store.__dict__["_cpu_jit_views"] = views
    return views


def compiled_decode(q: torch.Tensor, k: QuantizedKV, v: QuantizedKV,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, fmt: KVFormat,
                    reader: CodeReader, sm: float, threads: int | None = None,
                    shared=None, lse: torch.Tensor | None = None) -> torch.Tensor | None:
    """q (S, Hkv, G, D) fp32 in the codes' basis -> (S, Hkv, G, D) fp32 codes' basis, or
    None when the compiled kernel does not take this call (the caller runs the torch
    path). threads: None for cpu_jit.attention_threads(); shared: the batch's
    cpu_plan.SharedPrefix (None: read as sharing nothing); lse: (S, Hkv, G) fp32 filled
    with each query's natural log-sum-exp."""
    if q.device.type != "cpu" or not enabled():
        return None
    kind = storage_kind(fmt, reader)
    if kind is None or not cpu_jit.available():
        return None
    code, offset, table = kind
    lens = seq_lens.to(torch.int32).numpy()
    if lens.min() < 1:
        return None
    out = cpu_jit.decode(q.contiguous().numpy(), *_views(k), *_views(v),
                         block_tables.to(torch.int32).numpy(), lens, sm, code, offset, table,
                         threads or cpu_jit.attention_threads(), shared,
                         None if lse is None else lse.numpy())
    return None if out is None else torch.from_numpy(out)


def rows_compiled(x: torch.Tensor) -> bool:
    """Whether a row-wise op (RMSNorm) on ``x`` runs compiled: a
    non-empty contiguous fp32 CPU tensor that needs no gradient, the kernels on."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
            and x.numel() > 0 and not (x.requires_grad and torch.is_grad_enabled())
            and enabled() and cpu_jit.available())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x (..., H) -> RMSNorm(x) * w, or None (the caller runs torch)."""
    if not rows_compiled(x) or w.dtype != torch.float32 or (
            w.requires_grad and torch.is_grad_enabled()):
        return None
    H = x.shape[-1]
    out = cpu_jit.rms_norm(x.view(-1, H).numpy(), w.detach().numpy(), eps)
    return None if out is None else torch.from_numpy(out).view(x.shape)


def step_compiled(fmt: KVFormat, head_dim: int) -> bool:
    """Whether a CPU decode step of this cache can run the compiled decode layer (the
    runner also checks the step reads no exact window and no block mass)."""
    from .dispatch import get_backend

    return (enabled() and get_backend() in ("auto", "torch")
            and layer_kind(fmt, head_dim) is not None and cpu_jit.available())


class LayerKind(NamedTuple):
    """How ``decode_layer`` writes a format: storage kind, int4 offset, largest code
    (qmax, or levels when asymmetric), symmetric, rotation block size (0: none), the
    codebook's table (None for the other kinds)."""

    kind: int
    offset: int
    qmax: int
    symmetric: bool
    rot: int
    table: np.ndarray | None = None


@functools.lru_cache(maxsize=64)
def layer_kind(fmt: KVFormat, head_dim: int) -> LayerKind | None:
    """The fused decode layer's view of a format, None where it cannot write it (fp8,
    bf16, fp32, grouped scales: their layers write with torch and attend with ``attend``
    or the torch path)."""
    if head_dim % 2:
        return None
    if not fmt.has_scale:
        return LayerKind(cpu_jit.KIND_FP16, 0, 0, True, 0) \
            if fmt.storage_dtype == torch.float16 else None
    rot = hadamard_block_size(head_dim) if fmt.rotate else 0
    if isinstance(fmt, CodebookFormat):
        return LayerKind(cpu_jit.KIND_CODEBOOK, 0, 0, True, rot, codebook_table(fmt)) \
            if _jit_codebook(fmt, head_dim) else None
    bits = getattr(fmt, "bits", None)
    if bits not in (4, 8) or fmt.num_groups(head_dim) != 1:
        return None
    if bits == 8 and not fmt.symmetric:
        return None
    kind = cpu_jit.KIND_INT8 if bits == 8 else cpu_jit.KIND_INT4
    qmax = fmt.qmax if fmt.symmetric else fmt.levels
    return LayerKind(kind, fmt.offset, qmax, fmt.symmetric, rot)


def compiled_layer(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k: QuantizedKV, v: QuantizedKV, step: JitStep, lk: LayerKind, sm: float
                   ) -> torch.Tensor | None:
    """qkv (S, (Hq + 2 Hkv) * D) fp32 projection output (no RoPE); cos, sin (S, 1, D) fp32
    of layers.RotaryEmbedding.cos_sin. Writes the step's new k, v into ``k``, ``v`` at the
    planned slots and returns (S, Hq * D) fp32 attention output, original basis; None when
    the compiled kernel failed to compile (nothing was written)."""
    if not cpu_jit.available():
        return None
    S, D = qkv.shape[0], cos.shape[-1]
    out = cpu_jit.decode_layer(
        qkv.view(S, -1, D).numpy(), cos.view(S, D).numpy(), sin.view(S, D).numpy(), lk.rot,
        step.blocks, step.offsets, *_views(k), *_views(v), step.tables, step.lens,
        step.max_len, sm, lk.kind, lk.offset, lk.qmax, lk.symmetric,
        cpu_jit.attention_threads(), step.shared, lk.table)
    return None if out is None else torch.from_numpy(out).view(S, -1)
