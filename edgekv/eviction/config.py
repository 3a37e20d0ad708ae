"""Eviction settings: which policy, the per-sequence KV budget, what is always kept."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvictionConfig:
    """What the user asks for. ``None`` fields are derived from the budget by ``resolve``.

    policy:        a key of ``edgekv.eviction.EVICTION_POLICIES``
    max_kv_tokens: tokens one sequence may keep cached (None: the whole KV pool)
    sink_tokens:   first tokens always kept (attention sinks); rounded up to whole blocks
    window_tokens: most recent tokens always kept
    obs_window:    prompt queries that score the blocks at the end of each prefill chunk
                   (for policies that read attention mass)
    """

    policy: str
    max_kv_tokens: int | None = None
    sink_tokens: int | None = None
    window_tokens: int | None = None
    obs_window: int = 32

    def __post_init__(self):
        from .base import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}; valid: "
                             + ", ".join(POLICIES))
        for name in ("max_kv_tokens", "sink_tokens", "window_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.obs_window < 1:
            raise ValueError(f"obs_window must be >= 1, got {self.obs_window}")

    def resolve(self, block_size: int, pool_blocks: int,
                context: int | None = None) -> EvictionBudget:
        """Whole-block budget for a pool of ``pool_blocks`` blocks of ``block_size``, for a
        model of ``context`` positions (the budget must leave room to shift into it:
        ``context_shift.py``; unset, the budget is at most the context).

        Defaults: one sink block (StreamingLLM keeps 4 sink tokens; a block holds them at
        no extra cost) and a recent window of half the budget, at least one block (as H2O
        splits its budget between heavy hitters and recent tokens; on the demo model a
        half window beat a quarter or an eighth for h2o, and made no difference to the
        other policies); with a budget of 2 blocks, no sinks and no window (just the
        newest tokens). Raises
        ValueError when the budget cannot hold what must always be kept plus one block to
        write into.
        """
        bs = block_size
        tokens = pool_blocks * bs if self.max_kv_tokens is None else self.max_kv_tokens
        if context is not None and self.max_kv_tokens is None:
            tokens = min(tokens, context)
        if context is not None and tokens > context:
            raise ValueError(f"max_kv_tokens={tokens} is more than the model's context of "
                             f"{context} tokens; lower max_kv_tokens")
        if tokens > pool_blocks * bs:
            raise ValueError(f"max_kv_tokens={tokens} is more than the KV pool holds "
                             f"({pool_blocks} blocks of {bs} = {pool_blocks * bs} tokens); "
                             f"raise kv_memory or lower max_kv_tokens")
        blocks = tokens // bs
        if blocks < 2:
            raise ValueError(f"an eviction budget needs at least 2 blocks "
                             f"({2 * bs} tokens at block_size {bs}), got {tokens} tokens")
        small = blocks < 3
        sink = -(-(self.sink_tokens if self.sink_tokens is not None
                   else (0 if small else bs)) // bs)
        window = (self.window_tokens if self.window_tokens is not None
                  else (0 if small else max(1, blocks // 2) * bs))
        # blocks touched by the last `window` tokens, plus the last block being written
        protected = sink + -(-window // bs) + 1
        if protected > blocks:
            raise ValueError(f"sinks ({sink} blocks) + window ({window} tokens) + one block "
                             f"to write into need {protected} blocks; the budget is "
                             f"{blocks} blocks ({blocks * bs} tokens)")
        return EvictionBudget(self.policy, blocks, bs, sink, window, self.obs_window)


@dataclass(frozen=True)
class EvictionBudget:
    """The resolved budget, in whole blocks (what the evictor works with)."""

    policy: str
    blocks: int         # per sequence
    block_size: int
    sink_blocks: int    # the first table entries, never evicted
    window_tokens: int  # blocks holding any of the last window_tokens tokens are never evicted
    obs_window: int

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size
