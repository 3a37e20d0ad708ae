"""Age tiers (``kv_tiers="fp16:128,int8:2048,int4"``): each sequence's newest tokens in a
precise format, older ones demoted block by block into cheaper ones.

    spec.py     the syntax, the tier layout (block id ranges), splitting kv_memory (no torch)
    demote.py   moving blocks down as they age, or early under memory pressure
    kernels/tiered.py   attention over a sequence whose blocks live in several storages
"""

from .spec import TierLayout, TierSpec, parse_tiers, tier_blocks

__all__ = ["TierLayout", "TierSpec", "parse_tiers", "tier_blocks"]
