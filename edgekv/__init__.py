"""EdgeKV: LLM inference with a paged, quantized KV cache, for small machines.

Map of the package (one concept per module):
    config.py         CacheConfig (frozen) and memory-size parsing
    block_pool.py     free list and ref counts of KV blocks (pure Python)
    block_manager.py  per-sequence block tables, fork, copy-on-write
    kv_cache.py       per-layer quantized block storage, writes, accounting
    cli.py            the ``edgekv`` command
    edgekv.quant      KV formats (folder quant/)
    edgekv.kernels    paged attention: torch reference, fused kernels (folder kernels/)
    edgekv.models     model families (folder models/)
"""

from .block_manager import BlockManager, BlockTable, NoFreeBlocks
from .block_pool import BlockPool
from .config import CacheConfig, parse_memory
from .kv_cache import PagedKVCache

__version__ = "0.1.0"

__all__ = [
    "BlockManager", "BlockPool", "BlockTable", "CacheConfig", "NoFreeBlocks",
    "PagedKVCache", "parse_memory", "__version__",
]
