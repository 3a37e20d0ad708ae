"""The KV cache: blocks, their tables, their storage.

    block_pool.py     free lists (one per age tier) and reference counts
    block_manager.py  per-sequence block tables, fork, copy-on-write
    prefix_cache.py   prefix hashes: full blocks found again by their tokens
    kv_cache.py       per-layer quantized block storage, writes, accounting
    exact_window.py   the exact window: each sequence's newest tokens kept in fp16
    offload.py        a host pool for blocks swapped out of the device
    memory.py         the pool's size when none is given (kv_memory=None | "auto")
    context_shift.py  positions moved back inside the model's context (eviction)

Age tiers (edgekv.tiers) and eviction policies (edgekv.eviction) act on these.
"""
