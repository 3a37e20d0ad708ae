"""Frozen configuration of the paged KV cache, and parsing of memory sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgekv.quant import KVFormat, get_format

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as "512MiB", "2GiB", "1.5 GB", "4096"."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(
                f"not a memory size: {value!r} (use a number of bytes, or a number and a "
                f"unit: KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024), "
                f"e.g. '512MiB', '8GiB')"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class CacheConfig:
    """Shape and storage of the paged KV cache. Built once, passed down, never mutated.

    Block ids are shared by all layers: a block holds ``block_size`` consecutive tokens of
    one sequence in every layer, so one block costs ``bytes_per_block`` across the model.
    """

    num_layers: int
    num_kv_heads: int  # only KV heads are stored (GQA): query heads share them
    head_dim: int
    num_blocks: int
    block_size: int = 16  # tokens per block; a power of two so kernels tile it exactly
    kv_format: str = "int8"

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "num_blocks"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got "
                                 f"{getattr(self, field)!r}")
        bs = self.block_size
        if not isinstance(bs, int) or not (MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE) or bs & (
            bs - 1
        ):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, "
                             f"{MAX_BLOCK_SIZE}], got {bs!r}")
        self.format.check_head_dim(self.head_dim)  # raises ValueError on unknown name/shape

    @property
    def format(self) -> KVFormat:
        return get_format(self.kv_format)

    @property
    def bytes_per_token(self) -> int:
        """K+V bytes of one token across all layers, scales included."""
        return self.num_layers * self.format.bytes_per_token(self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @classmethod
    def for_budget(cls, kv_memory: int | str, num_layers: int, num_kv_heads: int,
                   head_dim: int, block_size: int = 16, kv_format: str = "int8") -> CacheConfig:
        """The config with as many blocks as fit in ``kv_memory`` bytes (at least one)."""
        budget = parse_memory(kv_memory)
        per_block = get_format(kv_format).bytes_per_token(num_kv_heads, head_dim)
        per_block *= num_layers * block_size
        if budget < per_block:
            raise ValueError(f"kv_memory {budget} bytes is smaller than one {kv_format} block "
                             f"of {block_size} tokens across {num_layers} layers "
                             f"({per_block} bytes)")
        return cls(num_layers, num_kv_heads, head_dim, budget // per_block, block_size,
                   kv_format)
