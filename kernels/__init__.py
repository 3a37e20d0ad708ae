"""Attention over the paged, quantized KV cache, and the writes into it.

``dispatch.py`` holds the entry points the runtime calls (``paged_decode_attention``,
``paged_prefill_attention``, ``write_kv``): fused Triton kernels on CUDA, the torch
reference on CPU, a switch to force either. ``reference.py`` is pure torch: the CPU path,
and the reference every fused kernel is tested against on the same quantized blocks.

    kv_tiles.py       format constants for the kernels; shared dequantize-in-registers tiles
    paged_decode.py   split-KV (flash-decoding) GQA decode kernel + launcher
    lse_merge.py      log-sum-exp merge of the decode kernel's split partials
    paged_prefill.py  causal prefill / append kernel + launcher
    quant_write.py    fused quantize-and-scatter of new K/V + launcher
    fp8_bits.py       fp8 <-> fp32 by bit operations (Triton helpers and torch twins)
    launch_checks.py  shape / dtype / stride checks shared by the launchers

Importing this package does not import Triton; the kernel modules load on first use.
"""

from .dispatch import (
    get_backend,
    paged_decode_attention,
    paged_prefill_attention,
    paged_prefill_block_mass,
    set_backend,
    write_kv,
)
from .reference import (
    decode_block_mass_ref,
    gather_blocks,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_block_mass_ref,
    write_kv_ref,
)

__all__ = [
    "gather_blocks", "paged_decode_attention_ref", "paged_prefill_attention_ref",
    "decode_block_mass_ref", "prefill_block_mass_ref", "write_kv_ref",
    "paged_decode_attention", "paged_prefill_attention", "paged_prefill_block_mass", "write_kv",
    "set_backend", "get_backend",
]
