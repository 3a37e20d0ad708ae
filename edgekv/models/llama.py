"""Llama (2, 3, 3.1, 3.2): the decoder the other families specialise.

Module names mirror the HF checkpoints (``model.layers.N.self_attn.q_proj`` ...), so a
safetensors state dict loads without renaming. Tokens of all sequences in a step are
flattened into one (T,) batch: no padding anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_fused
from .attention import AttentionMetadata, PagedAttention
from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, SwiGLU
from .registry import register_model


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = PagedAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, positions, rope, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)  # (T, hidden)
        meta.rope = self.rotary_emb.cos_sin(positions, x.dtype)  # once per step
        done = 0
        if meta.plan is not None and meta.plan.jit is not None:  # a CPU decode step
            done = cpu_fused.run(self, x, meta)  # the layers without their modules
        for layer in self.layers[done:]:
            x = layer(x, positions, self.rotary_emb, meta)
        return self.norm(x)

    def forward_from(self, first: int, x, positions, meta):
        """The layers from ``first`` on, given the hidden states (T, hidden) entering it:
        what ``forward`` computes when the layers before wrote nothing new (a probe that
        changes layer ``first``'s cache alone re-runs only the layers it can affect)."""
        meta.rope = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers[first:]:
            x = layer(x, positions, self.rotary_emb, meta)
        return self.norm(x)


@register_model("LlamaForCausalLM")
class LlamaForCausalLM(nn.Module):
    """Contract: ``forward`` writes this step's K/V into ``meta.kv_cache`` (every layer) and
    returns hidden states (T, hidden); ``compute_logits`` maps chosen rows to fp32 logits."""

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig.from_hf(hf)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head (again after a device move)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab)
