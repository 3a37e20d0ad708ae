"""Mistral: the Llama decoder. Sliding-window attention (v0.1) is not applied: contexts
beyond the window attend to everything, which the loader warns about."""

from __future__ import annotations

from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    pass
