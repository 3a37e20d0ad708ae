"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, SwiGLU MLP.

Per-step work is kept out of the layers: RoPE's cos/sin are computed once per step from
the positions the runner passes (``RotaryEmbedding.cos_sin``) and every layer only applies
them (``apply_rope``). Projections that read the same input run as one matmul
(``fused_linear``: q/k/v, gate/up), their weights fused on first use; on a CPU a small
model's decoder weights lie transposed in memory (``transpose_for_cpu``), which torch's GEMM
reads faster.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgekv.kernels.cpu_compiled import rms_norm as compiled_rms_norm

from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as the reference models do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one pass compiled on CPU, else torch's fused op
            out = compiled_rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
            return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies, with llama3 or linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
        # between is interpolated smoothly.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over whole head_dim, at arbitrary (per-token) positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, signed sin (T, 1, D) in ``dtype``: once per step. The sin
        carries rotate-half's sign (-sin on the first half), so a layer rotates with a roll.
        Computed from ``positions`` as given (they need not be token indices)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # (T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat([cos, cos], -1)[:, None, :].to(dtype),
                torch.cat([-sin, sin], -1)[:, None, :].to(dtype))

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """positions (T,); each x (T, heads, head_dim) -> rotated, same dtype."""
        return tuple(apply_rope(x, *self.cos_sin(positions, x.dtype)) for x in xs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated by cos / signed sin (T, 1, D) of ``RotaryEmbedding.cos_sin``:
    x * cos + rotate_half(x) * sin, where rotate_half(x) * sin == roll(x, D/2) * signed sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# Decoder weights up to this many bytes lie transposed on a CPU (transpose_for_cpu).
CPU_TRANSPOSE_MAX_BYTES = 64 << 20


def transpose_for_cpu(layers: nn.Module) -> bool:
    """On a CPU, store each plain nn.Linear weight under ``layers`` in (in, out) memory,
    seen through an (out, in) view, when all of them together fit in
    ``CPU_TRANSPOSE_MAX_BYTES``; returns whether they do. Such weights stay in the
    caches from step to step, and torch's GEMM reads (in, out) memory without repacking
    it on every call: measured on the demo model, one thread, 1.4x faster at 16 rows,
    1.1-1.4x at 4-8, as fast for a prefill. Larger weights stream from memory, where
    (out, in) rows read whole are faster (kernels/cpu_jit_layer.small_linear) and they
    stay as they are."""
    lins = [m for m in layers.modules() if type(m) is nn.Linear]
    ws = [m.weight for m in lins]
    if not ws or any(w.device.type != "cpu" or not w.is_floating_point() for w in ws) or \
            sum(w.numel() * w.element_size() for w in ws) > CPU_TRANSPOSE_MAX_BYTES:
        return False
    with torch.no_grad():
        for w in ws:
            if w.is_contiguous() and w.shape[1] > 1:
                w.data = w.data.t().contiguous().t()
    return True


def lies_transposed(weight: torch.Tensor) -> bool:
    """Whether an (out, in) weight is a view of (in, out) memory (a slice of one included)."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0]


def fused_linear(owner: nn.Module, names: tuple[str, ...]):
    """(weight, bias or None) of ``owner``'s nn.Linear children ``names`` stacked along the
    output features, or None when they cannot be fused (e.g. bitsandbytes layers).

    On first use (and again if a parameter was moved or replaced) the weights are copied
    into one tensor and each Linear's parameters become views of it, so the memory is not
    doubled and a later in-place update of a parameter (a checkpoint copied in) is seen by
    the fused matmul. The key is the parameters' storage, checked on every call.
    """
    lins = [getattr(owner, n) for n in names]
    if not all(type(m) is nn.Linear for m in lins):
        return None
    key = tuple(m.weight.data_ptr() for m in lins) + tuple(
        m.bias.data_ptr() if m.bias is not None else 0 for m in lins)
    cached = owner.__dict__.get("_fused")
    if cached is not None and cached[0] == key:
        return cached[1]
    has_bias = [m.bias is not None for m in lins]
    if any(has_bias) and not all(has_bias):
        return None
    with torch.inference_mode(False), torch.no_grad():
        if lies_transposed(lins[0].weight):  # stays (in, out): transpose_for_cpu
            w = torch.cat([m.weight.t() for m in lins], dim=1).t()
        else:
            w = torch.cat([m.weight for m in lins])  # (sum of out_features, in_features)
        b = torch.cat([m.bias for m in lins]) if all(has_bias) else None
        i = 0
        for m in lins:
            n = m.out_features
            m.weight.data = w[i:i + n]
            if b is not None:
                m.bias.data = b[i:i + n]
            i += n
    key = tuple(m.weight.data_ptr() for m in lins) + tuple(
        m.bias.data_ptr() if m.bias is not None else 0 for m in lins)
    owner.__dict__["_fused"] = (key, (w, b))
    return w, b


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_linear(self, ("gate_proj", "up_proj"))
        if fused is None:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = nn.functional.linear(x, *fused).chunk(2, dim=-1)  # (T, I) each
        return self.down_proj(nn.functional.silu(gate).mul_(up))
