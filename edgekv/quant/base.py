"""The KV format interface: how one K or V vector is stored, and what it costs.

A format is a pure function pair. ``quantize`` maps floats of shape ``(..., head_dim)`` to
a :class:`QuantizedKV` (codes + per-token-head scales, + zero points where the format is
asymmetric); ``dequantize`` maps it back. Formats hold no tensors that change: a rotating
format keeps a fixed orthogonal matrix, nothing else.

Storage basis. A rotating format stores ``x @ R`` (R orthogonal, see ``hadamard.py``) rather
than ``x``. Attention never needs to undo that per key: since ``(q R)·(k R) = q·k`` and
``sum_j p_j (v_j R) = (sum_j p_j v_j) R``, a caller rotates the query once with
:meth:`KVFormat.to_storage_basis`, attends over :meth:`KVFormat.decode` (values in the
storage basis), and rotates the output back once with :meth:`KVFormat.from_storage_basis`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from . import hadamard

# Scales are stored as fp16 and never fall below fp16's smallest normal number, so a zero or
# constant vector gets a finite scale (its codes are all zero) and never divides by zero.
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class QuantizedKV:
    """The stored form of K or V vectors.

    data:  (..., packed_dim)  codes, in the format's ``storage_dtype``
    scale: (..., num_groups)  the format's ``scale_dtype`` (fp16; the codebook's: e4m3),
                              or None for plain float formats
    zero:  (..., num_groups)  fp16 offset added after scaling, or None (symmetric formats)
    """

    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


class KVFormat(ABC):
    """One named way of storing K/V. Subclasses are immutable after construction.

    Class contract:
      - ``quantize(x)`` for x of shape (..., head_dim) returns a QuantizedKV whose leading
        dims equal x's; it does not modify x.
      - ``dequantize(quantize(x))`` has x's shape and approximates x in the original basis.
      - ``bytes_per_token(h, d)`` is the exact number of bytes one token's K and V take in
        one layer with h KV heads of size d: codes, scales and zeros.
    """

    name: str
    storage_dtype: torch.dtype  # dtype of QuantizedKV.data
    has_scale: bool = False
    has_zero: bool = False
    signed_scale: bool = False  # scales may be negative (never 0): the codebook's
    scale_dtype: torch.dtype = SCALE_DTYPE  # of QuantizedKV.scale (and .zero)
    rotate: bool = False

    # ---- shape rules -------------------------------------------------------------------
    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this format cannot store vectors of ``head_dim`` values."""
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")

    def packed_dim(self, head_dim: int) -> int:
        """Number of storage elements per vector of ``head_dim`` values."""
        self.check_head_dim(head_dim)
        return head_dim

    def num_groups(self, head_dim: int) -> int:
        """Number of scale groups per vector (0 for formats without scales)."""
        self.check_head_dim(head_dim)
        return 1 if self.has_scale else 0

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """Exact bytes of K + V for one token in one layer, scales and zeros included."""
        if num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be positive, got {num_kv_heads}")
        code_bytes = self.packed_dim(head_dim) * _itemsize(self.storage_dtype)
        per_group = _itemsize(self.scale_dtype) * (int(self.has_scale) + int(self.has_zero))
        per_vector = code_bytes + self.num_groups(head_dim) * per_group
        return 2 * num_kv_heads * per_vector

    # ---- the pure functions ------------------------------------------------------------
    @abstractmethod
    def quantize(self, x: torch.Tensor) -> QuantizedKV:
        """(..., head_dim) floats -> stored form. Applies the rotation if the format has one."""

    def quantize_storage(self, xs: torch.Tensor) -> QuantizedKV:
        """Quantize fp32 vectors already in the storage basis: ``quantize(x)`` equals
        ``quantize_storage(to_storage_basis(x.float()))`` to the bit. Lets a caller rotate
        several tensors (queries, keys, values) in one matmul."""
        assert not self.rotate, f"{self.name} must override quantize_storage"
        return self.quantize(xs)

    @abstractmethod
    def decode(self, q: QuantizedKV) -> torch.Tensor:
        """Stored form -> fp32 (..., head_dim) in the storage basis (still rotated)."""

    def dequantize(self, q: QuantizedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored form -> (..., head_dim) in the original basis."""
        return self.from_storage_basis(self.decode(q)).to(dtype)

    def to_storage_basis(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate vectors (queries, or K/V before quantizing) into the storage basis."""
        return x

    def from_storage_basis(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_storage_basis` (attention outputs)."""
        return x

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{self.name}: expected shape (..., head_dim), got a scalar")
        self.check_head_dim(x.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def fp16_scale(raw: torch.Tensor) -> torch.Tensor:
    """Round a float32 scale to its stored fp16 value, clamped away from zero."""
    return raw.clamp(min=MIN_SCALE, max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)


class GroupedFormat(KVFormat):
    """A format with a scale per ``group_size`` values (None: one per token-head), stored
    optionally Hadamard-rotated (``rotate``): the shape and basis rules the integer and
    codebook formats share. Subclasses define ``quantize_storage`` and ``decode``."""

    group_size: int | None = None

    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if self.group_size and head_dim % self.group_size:
            raise ValueError(f"{self.name}: head_dim {head_dim} is not divisible by the "
                             f"scale group size {self.group_size}")

    def num_groups(self, head_dim: int) -> int:
        self.check_head_dim(head_dim)
        return head_dim // self.group_size if self.group_size else 1

    def to_storage_basis(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard.rotate(x).to(x.dtype) if self.rotate else x

    def from_storage_basis(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard.rotate(x).to(x.dtype) if self.rotate else x

    def quantize(self, x: torch.Tensor) -> QuantizedKV:
        self._check_input(x)
        return self.quantize_storage(self.to_storage_basis(x.float()))
