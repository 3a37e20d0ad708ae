"""What the KV cache costs now, as ``kv_stats()`` reports it: the cache's own numbers and
those of the scheduler, offload, eviction, context shift, tiers and the exact window."""

from __future__ import annotations


def kv_stats(engine) -> dict:
    s = engine.cache.stats(engine.manager)
    sch = engine.scheduler
    s["preemptions"] = sch.num_preemptions
    s["prefix_caching"] = sch.prefix_salt is not None
    s["prefix_query_tokens"] = sch.prefix_query_tokens
    s["prefix_hit_tokens"] = sch.prefix_hit_tokens
    s["prefix_hit_rate"] = sch.prefix_hit_tokens / max(sch.prefix_query_tokens, 1)
    s.update(engine.offloader.stats() if engine.offloader is not None else {"offload": None})
    s.update(engine.evictor.stats() if engine.evictor is not None else {"eviction": None})
    if engine.shifter is not None:
        s.update(engine.shifter.stats())
    if engine.demoter is not None:
        s.update(engine.demoter.stats())
    s.update(engine.exact_window.stats() if engine.exact_window is not None else
             {"exact_window_tokens": 0})
    return s
