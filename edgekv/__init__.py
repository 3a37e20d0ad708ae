"""EdgeKV: LLM inference with a paged, quantized KV cache, for small machines.

Map of the package:
    llm.py            LLM: the Python API;  chat.py: chat sessions kept in the cache
    config.py         CacheConfig (frozen) and memory-size parsing
    names.py          format, policy and model names (no torch: the CLI parses with them)
    device.py         the device a model runs on;  text_input.py  text read from users
    engine/           requests in, tokens out: engine, scheduler, model runner, sampling
    cache/            block pool and tables, prefix hashes, paged storage, exact window,
                      offload, memory sizing
    tiers/            kv_tiers: older blocks demoted into cheaper formats as they age
    eviction/         token eviction in a fixed budget
    auto/             kv_format="auto": per-layer formats chosen by a load-time probe
    plan/             what fits on a GPU, and the budget controller
    session/          chat sessions saved and loaded
    cli/              the ``edgekv`` command;  eval/  ``edgekv eval``;  serve/  the server
    hf/               PagedQuantizedCache: the paged quantized cache as a transformers Cache
    quant/            KV formats;  kernels/  paged attention;  models/  model families
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import edgekv`` and ``edgekv --help`` do not pay for torch and transformers.
_LAZY = {
    "LLM": ".llm", "RequestOutput": ".engine.outputs", "SamplingParams": ".engine.sampling",
    "BlockManager": ".cache.block_manager", "BlockTable": ".cache.block_manager",
    "NoFreeBlocks": ".cache.block_manager", "BlockPool": ".cache.block_pool",
    "CacheConfig": ".config", "parse_memory": ".config", "PagedKVCache": ".cache.kv_cache",
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
