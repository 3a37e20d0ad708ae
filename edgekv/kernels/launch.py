"""The arguments the Triton decode and prefill launchers pass alike (imports Triton).

``attention_launch`` builds the kernels' leading arguments (the query in the storage
basis, both stores, the block tables, the lengths and the softmax scale in log2 units) and
the format's constexprs; ``from_storage`` turns a kernel's output back into q's basis.
"""

from __future__ import annotations

import torch
import triton.language as tl

from edgekv.quant import KVFormat, QuantizedKV

from .kv_tiles import dot_dtype, format_table, kernel_format, pad_half
from .launch_checks import store_args
from .window_attention import LOG2E


def attention_launch(q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, fmt: KVFormat,
                     sm_scale: float | None, precise: bool) -> tuple[torch.Tensor, tuple, dict]:
    """What the decode and the prefill launchers pass alike: ``(out, args, consts)``.

    out: the empty (T, Hq, D) output, in q's dtype, or fp32 in the storage basis when
    ``fmt.rotate`` (``from_storage`` turns it back). args: the kernels' first arguments,
    ``q_ptr, stride_qt, stride_qh, <K store>, <V store>, table_ptr, bt_ptr, stride_bt,
    lens_ptr, sm_scale_log2`` (q in the storage basis, unit stride along head_dim; the
    softmax scale, default ``D ** -0.5``, times log2(e)). consts: the format's constexprs
    (``HALF_P`` to ``PRECISE``; fp32 dots need no compensation). Raises UnsupportedFormat.
    """
    D = q.shape[2]
    kf = kernel_format(fmt, D)
    dot = dot_dtype(fmt, q.device)
    qs = fmt.to_storage_basis(q.float()) if fmt.rotate else q  # (T, Hq, D)
    qs = qs if qs.stride(-1) == 1 else qs.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32 if fmt.rotate else q.dtype)
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    args = (qs, qs.stride(0), qs.stride(1), *store_args(k_cache), *store_args(v_cache),
            format_table(fmt, q.device), block_tables, block_tables.stride(0), seq_lens,
            sm_scale * LOG2E)
    consts = dict(HALF_P=pad_half(D), KIND=kf.kind, OFFSET=kf.offset, GROUP=kf.group,
                  HAS_SCALE=kf.has_scale, HAS_ZERO=kf.has_zero, DOT=dot, WSCALE=kf.wscale,
                  PRECISE=precise and dot != tl.float32)
    return out, args, consts


def from_storage(out: torch.Tensor, q: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """The kernel's ``out`` (``attention_launch``) in q's basis and dtype."""
    return fmt.from_storage_basis(out).to(q.dtype) if fmt.rotate else out
