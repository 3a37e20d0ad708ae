"""What a request may be: checked before it is queued, changing nothing."""

from __future__ import annotations

from edgekv.engine.sampling import SamplingParams


def check_request(engine, token_ids: list[int], params: SamplingParams,
                  keep_cache: bool = False) -> None:
    """ValueError (one line) if ``engine`` cannot queue a request of these prompt tokens:
    empty, past the model's context or the KV pool (without eviction), ids outside the
    vocabulary, or a chat turn asking for samples or beams."""
    if not token_ids:
        raise ValueError("a prompt must have at least one token")
    max_len = engine.model_config.max_position
    if engine.evictor is None and len(token_ids) >= max_len:
        raise ValueError(f"prompt of {len(token_ids)} tokens does not fit the model's "
                         f"context of {max_len} tokens (an eviction policy reads "
                         f"past it)")
    pool = engine.cache_config.num_blocks * engine.cache_config.block_size
    if engine.evictor is None and len(token_ids) >= pool:
        raise ValueError(f"prompt of {len(token_ids)} tokens does not fit the KV pool of "
                         f"{pool} tokens: raise kv_memory or use an eviction policy")
    vocab = engine.model_config.vocab_size
    if min(token_ids) < 0 or max(token_ids) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got "
                         f"{min(token_ids)}..{max(token_ids)}")
    if keep_cache and (params.n > 1 or params.beam_width is not None):
        raise ValueError("a chat turn takes n=1 and no beam_width")
