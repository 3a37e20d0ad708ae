"""How the CPU attention path reads one format's stored rows: codes, not dequantized values.

With one scale (and zero) per token-head, a key's dot product and a value's weight need
the codes alone: ``q·k = s (q·c) + z Σq`` and ``Σ p v = Σ (p s) c + (Σ p z)``. So the
reader turns gathered codes into fp32 in as few ops as the storage allows, and attention
applies the K scale after the dot and folds the V scale into the weights, as the Triton
kernel does:

    int8           codes.float()                                    (signed, symmetric)
    fp8            codes.view(fp8).float()                          (the scale after)
    int4           LUT[byte] -> both nibbles at once, interleaved   (symmetric offset and
                   as (lo_0, hi_0, lo_1, hi_1, ...)                  all in the table)
    float formats  data.float()                                     (no scales)
    grouped        fmt.decode of the gathered rows (scales per group of channels)

int4's interleaved order is dims (0, D/2, 1, D/2 + 1, ...): the query is permuted into it
and the output back, each folded into the (D, D) matrix that rotates it anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from edgekv.quant import KVFormat, QuantizedKV
from edgekv.quant.hadamard import hadamard_matrix


@dataclass(frozen=True)
class CodeReader:
    """q_mat / o_mat: (D, D) fp32 taking a query into the codes' order and basis and an
    output back (None: identity). ``token_scale``: scales per token-head, applied after
    the dot (False: ``read`` returns values)."""

    fmt: KVFormat
    head_dim: int
    q_mat: torch.Tensor | None
    o_mat: torch.Tensor | None
    lut: torch.Tensor | None  # (256, 2) fp32 for int4: (low nibble, high nibble) - offset
    token_scale: bool

    def read(self, store: QuantizedKV, rows: torch.Tensor) -> torch.Tensor:
        """rows (N,) int64 -> (N, D) fp32 codes (values, without token_scale)."""
        P = store.data.shape[-1]
        data = store.data.view(-1, P).index_select(0, rows)  # (N, P)
        if not self.token_scale:
            if store.scale is None:
                return data.float()
            g = store.scale.shape[-1]
            return self.fmt.decode(QuantizedKV(
                data, store.scale.view(-1, g).index_select(0, rows),
                None if store.zero is None else store.zero.view(-1, g).index_select(0, rows)))
        if self.lut is not None:
            return self.lut[data.int()].view(-1, self.head_dim)  # (N, P, 2) -> (N, D)
        if self.fmt.storage_dtype == torch.uint8:  # fp8 bytes
            return data.view(self.fmt.fp8_dtype).float()
        return data.float()

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) queries, original basis -> fp32 in the codes' order and basis."""
        return x.float() if self.q_mat is None else x.float() @ self.q_mat

    def from_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) outputs in the codes' order and basis -> original basis, fp32."""
        return x if self.o_mat is None else x @ self.o_mat


def reader_for(fmt: KVFormat, head_dim: int, device: torch.device) -> CodeReader:
    return _reader(fmt, head_dim, str(device))


@functools.lru_cache(maxsize=64)
def _reader(fmt: KVFormat, head_dim: int, device: str) -> CodeReader:
    bits = getattr(fmt, "bits", None)
    grouped = fmt.has_scale and fmt.num_groups(head_dim) != 1
    token_scale = fmt.has_scale and not grouped
    rot = hadamard_matrix(head_dim, device) if fmt.rotate else None
    lut = None
    if bits == 4 and token_scale:
        byte = torch.arange(256)
        lut = torch.stack([byte & 0xF, byte >> 4], -1).float() - fmt.offset  # (256, 2)
        lut = lut.to(device)
        half = head_dim // 2
        perm = torch.stack([torch.arange(half), torch.arange(half) + half], -1).reshape(-1)
        eye = torch.eye(head_dim, device=device)
        rot = eye if rot is None else rot
        return CodeReader(fmt, head_dim, rot[:, perm].contiguous(),
                          rot[perm, :].contiguous(), lut, True)
    return CodeReader(fmt, head_dim, rot, rot, lut, token_scale)
