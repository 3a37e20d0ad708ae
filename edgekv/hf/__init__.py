"""EdgeKV's paged, quantized KV cache inside stock transformers models.

    pool.py   KVPool: blocks (PagedKVCache) + block tables (BlockManager), shareable
    cache.py  PagedQuantizedCache: a ``transformers.Cache`` over a KVPool

    from edgekv.hf import PagedQuantizedCache
    cache = PagedQuantizedCache(model.config, kv_format="int8", kv_memory="512MiB")
    model.generate(**inputs, past_key_values=cache)
"""

from .cache import PagedQuantizedCache, PagedQuantizedLayer
from .pool import KVPool

__all__ = ["KVPool", "PagedQuantizedCache", "PagedQuantizedLayer"]
