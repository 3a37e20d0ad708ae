"""EdgeKV: LLM inference with a paged, quantized KV cache, for small machines.

Map of the package:
    llm.py            LLM: the Python API;  chat.py: chat sessions kept in the cache
    config.py         CacheConfig (frozen);  units.py  byte sizes parsed and printed
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

import lazy_loader

__version__ = "0.1.0"

# Imported on first use, so that ``import edgekv`` and ``edgekv --help`` do not pay for
# torch and transformers (``dir(edgekv)`` lists them all the same).
__getattr__, _, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "llm": ["LLM"],
    "engine.outputs": ["RequestOutput"],
    "engine.sampling": ["SamplingParams"],
    "cache.block_manager": ["BlockManager", "BlockTable", "NoFreeBlocks"],
    "cache.block_pool": ["BlockPool"],
    "cache.kv_cache": ["PagedKVCache"],
    "config": ["CacheConfig"],
    "units": ["parse_memory"],
})
__all__ = [*__all__, "__version__"]


def __dir__() -> list[str]:  # the lazy names and what is already here (__version__, ...)
    return sorted(set(globals()) | set(__all__))
