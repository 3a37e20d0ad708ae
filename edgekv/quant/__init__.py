"""KV formats: how K/V vectors are stored (quantize / dequantize / pack) and what they cost.

    from edgekv.quant import get_format, FORMATS
    fmt = get_format("int4")
    q = fmt.quantize(k)            # k: (..., head_dim) -> codes + per-token-head scales
    k_hat = fmt.dequantize(q)      # (..., head_dim) fp32
    fmt.bytes_per_token(8, 128)    # exact K+V bytes per token per layer, scales included

``FORMATS`` are the names users pick; ``VARIANTS`` are alternative designs kept so that
evaluations can show why the defaults were chosen (see README, "KV formats").
"""

from __future__ import annotations

import torch

from .base import MIN_SCALE, SCALE_DTYPE, KVFormat, QuantizedKV
from .codebook import CodebookFormat
from .float_formats import FloatFormat
from .fp8 import Fp8Format
from .integer import IntFormat
from .packing import pack_int4, unpack_int4

_REGISTRY: dict[str, KVFormat] = {}


def register(fmt: KVFormat) -> KVFormat:
    assert fmt.name not in _REGISTRY, f"format {fmt.name!r} registered twice"
    _REGISTRY[fmt.name] = fmt
    return fmt


# The user-facing formats. int8 and int4 rotate head_dim (Hadamard) before quantizing:
# measured on keys with outlier channels, rotation cuts int8's error 4x and int4's 3x at
# no byte cost (scripts/bench_formats.py).
for _f in (
    FloatFormat("fp32", torch.float32),
    FloatFormat("fp16", torch.float16),
    FloatFormat("bf16", torch.bfloat16),
    IntFormat("int8", bits=8, symmetric=True, rotate=True),
    Fp8Format("fp8", torch.float8_e4m3fn),
    Fp8Format("fp8_e5m2", torch.float8_e5m2),
    IntFormat("int4", bits=4, symmetric=False, rotate=True),
):
    register(_f)
FORMATS: tuple[str, ...] = tuple(_REGISTRY)

# Alternatives measured against the defaults.
for _f in (
    IntFormat("int8_norot", bits=8, symmetric=True, rotate=False),
    IntFormat("int4_norot", bits=4, symmetric=False, rotate=False),
    IntFormat("int4_sym", bits=4, symmetric=True, rotate=True),
    IntFormat("int4_g32", bits=4, symmetric=False, group_size=32, rotate=True),
    CodebookFormat("int4_nl", group_size=16),
):
    register(_f)
VARIANTS: tuple[str, ...] = tuple(n for n in _REGISTRY if n not in FORMATS)


def get_format(name: str | KVFormat) -> KVFormat:
    """Look a format up by name (a KVFormat is returned as it is)."""
    if isinstance(name, KVFormat):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown KV format {name!r}; valid formats: {', '.join(FORMATS)} "
            f"(variants: {', '.join(VARIANTS)})"
        ) from None


def stores(name: str, head_dim: int) -> bool:
    """Whether format ``name`` can store heads of ``head_dim`` (groups, packing)."""
    try:
        get_format(name).check_head_dim(head_dim)
    except ValueError:
        return False
    return True


__all__ = [
    "FORMATS", "VARIANTS", "KVFormat", "QuantizedKV", "get_format", "register", "stores",
    "CodebookFormat", "FloatFormat", "Fp8Format", "IntFormat", "pack_int4", "unpack_int4",
    "SCALE_DTYPE", "MIN_SCALE",
]
