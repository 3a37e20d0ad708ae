"""SnapKV-style: keep the blocks that the most recent queries attend to.

SnapKV scores prompt tokens by the attention of an observation window at the end of the
prompt. Here each prefill chunk's last ``obs_window`` queries score the blocks, and decode
steps keep scoring them; older observations fade (a decay of ``1 - 1/obs_window`` per
query), so the scores say what the *recent* queries need, where H2O's say what all
queries so far needed.
"""

from __future__ import annotations

import torch

from .base import EvictionPolicy, lowest_scores, register


@register
class SnapKVPolicy(EvictionPolicy):
    name = "snapkv"
    needs_mass = True

    def __init__(self, obs_window: int = 32):
        super().__init__(obs_window)
        self.decay = 1.0 - 1.0 / obs_window

    def observe(self, scores: torch.Tensor, mass: torch.Tensor, num_queries: int
                ) -> torch.Tensor:
        return scores * self.decay**num_queries + mass

    def choose(self, candidates: list[int], scores: torch.Tensor, n: int) -> list[int]:
        return lowest_scores(candidates, scores, n)
