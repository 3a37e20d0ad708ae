"""Teacher-forced scoring through the KV cache: every position's logits of a given text,
read back exactly as generation reads them (``LLM.score``, ``edgekv eval``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgekv.engine.sampling import SamplingParams
from edgekv.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from edgekv.engine.engine import Engine


@torch.inference_mode()
def score(engine: Engine, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
    """Teacher-forced logits (T, vocab) fp32 of every position of ``token_ids``.

    The tokens go through the cache in chunks of ``chunk_size`` (None: one prefill;
    1: token by token, each reading its history from the cache exactly as decode
    does). With an eviction policy, chunks are capped at the KV budget and blocks are
    evicted between them, as in generation. Runs outside the scheduler, between steps,
    and frees its blocks after.
    """
    seq = engine.new_sequence(token_ids, SamplingParams(max_tokens=1))
    chunk = chunk_size or max(len(token_ids), 1)
    out = []
    try:
        while seq.num_computed < seq.num_tokens:
            n = min(chunk, seq.num_tokens - seq.num_computed)
            if engine.demoter is not None:  # a chunk must fit in the newest tier
                n = min(n, engine.scheduler.max_num_batched_tokens)
            if engine.evictor is not None:
                n = engine.evictor.fit(seq, n)
                if engine.manager.pool.num_free < engine.shifter.blocks_needed(seq.seq_id, n):
                    raise ValueError("no free KV block to shift the context into")
                engine.shifter.fit(seq.seq_id, n)
            short = engine.manager.blocks_needed(seq.seq_id, n) - engine.manager.pool.num_free
            if short > 0 and engine.demoter is not None:  # age tiers: demote early
                engine.demoter.relieve(short)
            if not engine.manager.can_append(seq.seq_id, n):
                raise ValueError(f"{seq.num_tokens} tokens do not fit in the KV pool "
                                 f"({engine.cache_config.num_blocks} blocks of "
                                 f"{engine.cache_config.block_size})")
            _, copies = engine.manager.append_slots(seq.seq_id, n)
            engine.cache.copy_blocks(copies)
            with engine.guard.interruptible():
                logits, _ = engine.runner.run(ScheduledBatch([seq], [n]), all_logits=True)
            seq.num_computed += n
            if engine.demoter is not None:  # age tiers: as after an engine step
                engine.demoter.age()
            out.append(logits)
    finally:
        if seq.seq_id in engine.manager.tables:
            engine.manager.free(seq.seq_id)
        if engine.evictor is not None:
            engine.evictor.forget(seq.seq_id)
        if engine.exact_window is not None:
            engine.exact_window.forget(seq.seq_id)
    return torch.cat(out)
