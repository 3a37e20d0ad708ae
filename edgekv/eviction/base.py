"""The interface every eviction policy implements, and the registry the CLI reads."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class EvictionPolicy(ABC):
    """Chooses which of a sequence's cached blocks to drop.

    A policy is stateless across sequences: the evictor keeps each sequence's block scores
    (one float per block-table entry) and hands them in. ``needs_mass`` policies get, after
    every model step, the attention mass each block received (summed over layers and query
    heads, normalised so that one query contributes 1.0 in total).
    """

    name: str = ""
    needs_mass: bool = False

    def __init__(self, obs_window: int = 32):
        """``obs_window``: the queries one prefill observation spans (EvictionConfig's)."""
        self.obs_window = obs_window

    def observe(self, scores: torch.Tensor, mass: torch.Tensor, num_queries: int
                ) -> torch.Tensor:
        """New scores after a step. scores, mass: (num_blocks,) fp32; ``num_queries``
        queries produced ``mass``. Default: accumulate."""
        return scores + mass

    @abstractmethod
    def choose(self, candidates: list[int], scores: torch.Tensor, n: int) -> list[int]:
        """``n`` of ``candidates`` (block-table indices, ascending, i.e. oldest first) to
        evict. ``scores``: (num_blocks,) this sequence's scores, indexed by table index."""


def lowest_scores(candidates: list[int], scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` candidates with the lowest scores; ties go to the oldest."""
    cand = torch.tensor(candidates, dtype=torch.long, device=scores.device)
    order = torch.argsort(scores[cand], stable=True)  # ascending score, oldest first on ties
    return sorted(cand[order[:n]].tolist())


POLICIES: dict[str, type[EvictionPolicy]] = {}


def register(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    assert cls.name and cls.name not in POLICIES, cls
    POLICIES[cls.name] = cls
    return cls
