"""Qwen3: the Llama decoder with RMSNorm over each q and k head before RoPE."""

from __future__ import annotations

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig.from_hf(hf, qk_norm=True)
