"""Attention over the paged, quantized KV cache.

``reference.py`` is pure torch: the CPU path, and the reference every fused kernel is
tested against on the same quantized blocks.
"""

from .reference import gather_blocks, paged_decode_attention_ref, paged_prefill_attention_ref

__all__ = ["gather_blocks", "paged_decode_attention_ref", "paged_prefill_attention_ref"]
