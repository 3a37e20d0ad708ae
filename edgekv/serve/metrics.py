"""``GET /metrics``: the engine's state in the Prometheus text format.

A collector for prometheus_client that reads the snapshot the engine thread publishes
after every step (``EngineLoop.stats``): a scrape never touches the engine itself.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (name, help, snapshot key, kind)
METRICS = [
    ("edgekv_requests_running", "Sequences the engine is stepping.", "running", "gauge"),
    ("edgekv_requests_waiting", "Sequences queued for admission.", "waiting", "gauge"),
    ("edgekv_kv_blocks_used", "KV cache blocks holding tokens.", "blocks_used", "gauge"),
    ("edgekv_kv_blocks_total", "KV cache blocks in the pool.", "blocks_total", "gauge"),
    ("edgekv_kv_bytes_used", "KV cache bytes of the blocks in use.", "bytes_used", "gauge"),
    ("edgekv_kv_bytes_per_token", "KV cache bytes one token costs (all layers).",
     "bytes_per_token", "gauge"),
    ("edgekv_kv_utilization", "Fraction of the KV pool's tokens in use.", "utilization",
     "gauge"),
    ("edgekv_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache, as a "
     "fraction of the prompt tokens looked up.", "prefix_hit_rate", "gauge"),
    ("edgekv_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
     "prefix_hit_tokens", "counter"),
    ("edgekv_preemptions", "Sequences preempted for want of KV blocks.", "preemptions",
     "counter"),
    ("edgekv_evicted_tokens", "Tokens an eviction policy dropped from the cache.",
     "evicted_tokens", "counter"),
    ("edgekv_swaps_out", "KV swaps to host memory.", "swaps_out", "counter"),
    ("edgekv_swaps_in", "KV swaps back from host memory.", "swaps_in", "counter"),
    ("edgekv_generation_tokens", "Tokens generated.", "tokens_generated", "counter"),
    ("edgekv_requests_finished", "Requests finished (completed, stopped or aborted).",
     "requests_finished", "counter"),
]


class EngineCollector:
    def __init__(self, stats):
        self.stats = stats  # () -> dict, the latest snapshot

    def collect(self):
        s = self.stats()
        for name, doc, key, kind in METRICS:
            value = float(s.get(key) or 0)
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


def registry_for(stats) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(EngineCollector(stats))
    return reg


__all__ = ["CONTENT_TYPE", "registry_for", "render"]


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
