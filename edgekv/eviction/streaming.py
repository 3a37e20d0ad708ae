"""StreamingLLM: attention sinks + a recent window; the middle goes, oldest first."""

from __future__ import annotations

import torch

from .base import EvictionPolicy, register


@register
class StreamingPolicy(EvictionPolicy):
    """Drops the oldest evictable blocks. Reads no attention: costs nothing per step."""

    name = "streaming"

    def choose(self, candidates: list[int], scores: torch.Tensor, n: int) -> list[int]:
        return candidates[:n]
