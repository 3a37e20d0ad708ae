"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as the reference models do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
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

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """positions (T,); each x (T, heads, head_dim) -> rotated, same dtype."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # (T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # (T, 1, D)
        out = []
        for x in xs:
            c, s = cos.to(x.dtype), sin.to(x.dtype)
            x1, x2 = x.chunk(2, dim=-1)
            out.append(x * c + torch.cat([-x2, x1], dim=-1) * s)
        return tuple(out)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
