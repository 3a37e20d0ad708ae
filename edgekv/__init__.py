"""EdgeKV: LLM inference with a paged, quantized KV cache, for small machines.

Map of the package (one concept per module):
    config.py         CacheConfig (frozen) and memory-size parsing
    block_pool.py     free list and ref counts of KV blocks (pure Python)
    block_manager.py  per-sequence block tables, fork, copy-on-write
    kv_cache.py       per-layer quantized block storage, writes, accounting
    sampling.py       SamplingParams and the sampler
    sequence.py       one request's tokens and state
    scheduler.py      continuous batching, chunked prefill, admission, preemption
    model_runner.py   batch -> tensors -> model -> logits
    engine.py         Engine.step(): schedule, run, sample, postprocess
    llm.py            LLM: the Python API;  chat.py: chat sessions kept in the cache
    memory.py         the KV pool's size when the user gives none (kv_memory=None | "auto")
    plan/             what fits on a GPU, from a model's config (``edgekv plan``)
    hf/               PagedQuantizedCache: the paged quantized cache as a transformers Cache
    cli.py            the ``edgekv`` command (cli_plan.py: ``edgekv plan``)
    edgekv.quant      KV formats (folder quant/)
    edgekv.kernels    paged attention: torch reference, fused kernels (folder kernels/)
    edgekv.models     model families (folder models/)
"""

from .block_manager import BlockManager, BlockTable, NoFreeBlocks
from .block_pool import BlockPool
from .config import CacheConfig, parse_memory
from .kv_cache import PagedKVCache
from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "SamplingParams", "RequestOutput",
    "BlockManager", "BlockPool", "BlockTable", "CacheConfig", "NoFreeBlocks",
    "PagedKVCache", "parse_memory", "__version__",
]
