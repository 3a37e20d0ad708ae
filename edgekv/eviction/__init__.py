"""Token eviction: long conversations and documents inside a fixed KV budget.

    config.py      EvictionConfig (what the user asks) -> EvictionBudget (whole blocks)
    base.py        EvictionPolicy interface and the registry
    streaming.py   sinks + recent window (StreamingLLM)
    h2o.py         heavy hitters by accumulated attention mass (H2O)
    snapkv.py      blocks the recent queries attend to (SnapKV-style observation window)
    evictor.py     applies a policy to block tables inside the scheduler's step

Policies are picked by name: ``LLM(eviction="h2o")``, ``edgekv chat --eviction h2o``.
"""

from . import h2o, snapkv, streaming  # noqa: F401  (registers the policies)
from .base import POLICIES, EvictionPolicy, register
from .config import EvictionBudget, EvictionConfig
from .evictor import Evictor

EVICTION_POLICIES: tuple[str, ...] = tuple(POLICIES)

__all__ = ["EVICTION_POLICIES", "POLICIES", "EvictionPolicy", "register", "EvictionConfig",
           "EvictionBudget", "Evictor"]
