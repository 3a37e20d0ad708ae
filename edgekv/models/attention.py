"""Attention over the paged KV cache: per-step metadata and the attention layer.

``AttentionMetadata`` is built once per engine step (tokens of all sequences flattened)
and read by every layer, with the step's plan (RoPE cos/sin of the step's positions; on
CPU the storage rows of the new tokens and the decode buckets, kernels/cpu_plan.py); the
layer writes its new K/V into their slots, then attends over each sequence's blocks
(decode when every sequence has one new token, prefill otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgekv.kernels import (
    get_backend,
    paged_decode_attention,
    paged_prefill_attention,
    paged_prefill_block_mass,
)
from edgekv.kernels.cpu_compiled import compiled_layer, layer_kind
from edgekv.kernels.cpu_plan import StepPlan
from edgekv.kernels.cpu_write import write_kv_storage
from edgekv.kernels.tiered import TierTables, tiered_decode_attention, tiered_prefill_attention

from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, apply_rope, fused_linear


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends over.

    slot_mapping: (T,) int64   flat cache slot of each new token
    block_tables: (S, max_blocks) int32
    seq_lens:     (S,) int32   KV length of each sequence after this step
    cu_seqlens_q: (S + 1,) int32  offsets of each sequence's new tokens in T
    max_query_len: largest number of new tokens of one sequence (1 means pure decode)
    max_seq_len:   largest seq_lens entry (known on the host: kernels size grids with it)
    block_mass:    (S, max_blocks) fp32 or None: when set, every layer adds the attention
                   mass each block receives (decode: from the step's query; prefill: from
                   each sequence's last ``mass_window`` queries); eviction policies read it
    exact_window:  (edgekv.cache.exact_window.ExactWindow, ExactWindowStep) or None: each layer also
                   writes the new K/V to the sequences' exact rings and reads their newest
                   tokens from there (``LLM(exact_window=...)``)
    plan:          kernels.cpu_plan.StepPlan or None: the step's storage rows and decode
                   buckets, planned once (the runner makes one on CPU)
    rope:          (cos, signed sin), each (T, 1, D), or None: set by the model once per
                   step from the positions it is given (RotaryEmbedding.cos_sin)
    tiers:         kernels.tiered.TierTables or None: with age tiers (``kv_tiers``), each
                   sequence's blocks split by tier, planned once per step
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    max_seq_len: int
    kv_cache: object  # edgekv.cache.kv_cache.PagedKVCache
    block_mass: torch.Tensor | None = None
    mass_window: int = 32
    exact_window: tuple | None = None
    plan: StepPlan | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    tiers: TierTables | None = None


class PagedAttention(nn.Module):
    """Projections, RoPE, optional q/k norm, cache write, paged attention, output proj."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps)
            self.k_norm = RMSNorm(d, cfg.rms_eps)
        self.scale = d**-0.5

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
             meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k, v (T, Hkv, D), RoPE applied: one matmul and one rotation for
        q and k together where the projections fuse and there is no q/k norm."""
        T, Hq, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = meta.rope if meta.rope is not None else rope.cos_sin(positions, x.dtype)
        fused = fused_linear(self, ("q_proj", "k_proj", "v_proj"))
        if fused is None:
            q = self.q_proj(x).view(T, Hq, D)
            k = self.k_proj(x).view(T, Hkv, D)
            v = self.v_proj(x).view(T, Hkv, D)
        else:
            qkv = nn.functional.linear(x, *fused).view(T, Hq + 2 * Hkv, D)
            if not hasattr(self, "q_norm"):
                qk = apply_rope(qkv[:, : Hq + Hkv], cos, sin)  # cos/sin in x's dtype
                return qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :]
            q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), \
            apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)), v

    def _compiled(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """A CPU decode step in one compiled call after the qkv matmul (RoPE, rotation,
        quantize-and-write, attention: kernels/cpu_jit_loops.decode_layer), or None where
        the step was not planned for it or it failed to compile (nothing written then)."""
        step = meta.plan.jit if meta.plan is not None else None
        fused = fused_linear(self, ("q_proj", "k_proj", "v_proj")) if step is not None \
            else None
        if fused is None or hasattr(self, "q_norm"):
            return None
        cache = meta.kv_cache
        lk = layer_kind(cache.formats[self.layer_idx], self.head_dim)
        cos, sin = meta.rope
        k_store, v_store = cache.layers[self.layer_idx]
        qkv = nn.functional.linear(x, *fused).float()  # (T, (Hq + 2 Hkv) * D)
        o = compiled_layer(qkv, cos.float(), sin.float(), k_store, v_store, step, lk,
                           self.scale)
        return None if o is None else self.o_proj(o.to(x.dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        out = self._compiled(x, meta)
        if out is not None:
            return out
        q, k, v = self._qkv(x, positions, rope, meta)
        cache = meta.kv_cache
        fmt = cache.formats[self.layer_idx]
        k_store, v_store = cache.layers[self.layer_idx]
        plan = meta.plan
        if plan is not None and plan.jit is not None:  # planned for the compiled kernel
            plan = None  # that did not run: the torch path plans for itself
        q_storage = None
        if plan is not None and k.device == k_store.data.device and get_backend() != "reference":
            # CPU: q, k, v into the storage basis in one matmul; rows planned once per step
            Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            heads = torch.cat([q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)])
            heads = fmt.to_storage_basis(heads.float())  # (Hq + 2 Hkv, T, D)
            write_kv_storage(k_store, v_store, heads[Hq:].view(2, Hkv * T, D),
                             plan.write_rows, fmt)
            q_storage = heads[:Hq].transpose(0, 1)  # (T, Hq, D)
        else:
            cache.write(self.layer_idx, k, v, meta.slot_mapping)
        exact = window = None
        if meta.exact_window is not None:  # exact newest tokens (edgekv/cache/exact_window.py)
            window, step = meta.exact_window
            if meta.max_query_len == 1:  # decode reads the ring with its new token in it
                window.write(self.layer_idx, k, v, step)
                exact = window.kv(self.layer_idx, step)
            else:  # prefill reads the ring as it was, and its own new K/V
                exact = window.kv(self.layer_idx, step, k, v)
        mass = meta.block_mass
        if meta.tiers is not None:  # age tiers: blocks in several storages
            o = self._tiered(q, meta, exact)
        elif meta.max_query_len == 1:
            o = paged_decode_attention(q if q_storage is None else q_storage, k_store,
                                       v_store, meta.block_tables, meta.seq_lens,
                                       fmt, self.scale, max_seq_len=meta.max_seq_len,
                                       return_block_mass=mass is not None, exact=exact,
                                       plan=plan, q_storage_basis=q_storage is not None)
            if mass is not None:
                o, step_mass = o
                mass += step_mass
        else:
            o = paged_prefill_attention(q, k_store, v_store, meta.block_tables, meta.seq_lens,
                                        meta.cu_seqlens_q, fmt, self.scale,
                                        max_q_len=meta.max_query_len, exact=exact)
            if mass is not None:
                mass += paged_prefill_block_mass(q, k_store, meta.block_tables, meta.seq_lens,
                                                 meta.cu_seqlens_q, fmt, self.scale,
                                                 last_n=meta.mass_window)
        if window is not None and meta.max_query_len > 1:
            window.write(self.layer_idx, k, v, step)
        return self.o_proj(o.reshape(T, -1).to(x.dtype))  # (T, hidden)

    def _tiered(self, q: torch.Tensor, meta: AttentionMetadata, exact) -> torch.Tensor:
        """Attention over a cache whose blocks live in several age tiers (q in the original
        basis; block mass is not read with tiers)."""
        stores = meta.kv_cache.tier_stores(self.layer_idx)
        if meta.max_query_len == 1:
            return tiered_decode_attention(q, stores, meta.block_tables, meta.tiers,
                                           meta.seq_lens, self.scale, exact)
        return tiered_prefill_attention(q, stores, meta.block_tables, meta.seq_lens,
                                        meta.cu_seqlens_q, self.scale, exact,
                                        max_q_len=meta.max_query_len)
