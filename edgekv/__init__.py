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
    auto/             kv_format="auto": per-layer formats chosen by a load-time probe
    tiers/            kv_tiers: older blocks demoted into cheaper formats as they age
    session_io.py     chat sessions saved and loaded (session_check.py, session_blocks.py)
    plan/             what fits on a GPU, from a model's config (``edgekv plan``)
    hf/               PagedQuantizedCache: the paged quantized cache as a transformers Cache
    cli.py            the ``edgekv`` command (cli_plan.py: ``edgekv plan``)
    edgekv.quant      KV formats
    edgekv.kernels    paged attention: torch reference, fused kernels
    edgekv.models     model families
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import edgekv`` and ``edgekv --help`` do not pay for torch and transformers.
_LAZY = {
    "LLM": ".llm", "RequestOutput": ".llm", "SamplingParams": ".sampling",
    "BlockManager": ".block_manager", "BlockTable": ".block_manager",
    "NoFreeBlocks": ".block_manager", "BlockPool": ".block_pool",
    "CacheConfig": ".config", "parse_memory": ".config", "PagedKVCache": ".kv_cache",
}

__all__ = [
    "LLM", "SamplingParams", "RequestOutput",
    "BlockManager", "BlockPool", "BlockTable", "CacheConfig", "NoFreeBlocks",
    "PagedKVCache", "parse_memory", "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgekv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
