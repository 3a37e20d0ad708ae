"""H2O (heavy hitters): keep the blocks that have received the most attention so far.

Scores accumulate over every decode step (and the observation window at the end of each
prefill chunk). They are aggregated over layers and heads, not kept per layer: a block id
is shared by all layers (one block table per sequence), so a block can only be dropped
from every layer at once, and the score that decides it must speak for all of them.
"""

from __future__ import annotations

import torch

from .base import EvictionPolicy, lowest_scores, register


@register
class H2OPolicy(EvictionPolicy):
    """Evicts the evictable blocks with the least accumulated attention mass (ties: the
    oldest goes first)."""

    name = "h2o"
    needs_mass = True

    def choose(self, candidates: list[int], scores: torch.Tensor, n: int) -> list[int]:
        return lowest_scores(candidates, scores, n)
