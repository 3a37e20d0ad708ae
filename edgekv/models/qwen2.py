"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q, k and v projections."""

from __future__ import annotations

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig.from_hf(hf, qkv_bias=True, o_bias=False)
