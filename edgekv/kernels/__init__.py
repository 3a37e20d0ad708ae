"""Attention over the paged, quantized KV cache, and the writes into it.

``dispatch.py`` holds the entry points the runtime calls (``paged_decode_attention``,
``paged_prefill_attention``, ``write_kv``): fused Triton kernels on CUDA, the torch path on
CPU, a switch to force either or the oracle. ``reference.py`` is the oracle: simple pure
torch that every other path is tested against on the same quantized blocks, never the
product path.

    cpu_plan.py       the CPU path's per-step plan: storage rows, decode length buckets, or
                      the compiled kernels' step (JitStep)
    cpu_compiled.py   routing CPU calls to the compiled kernels when they can take them
    cpu_jit.py        the compiled kernels' set-up (numba, lazily) and calls; its loops:
      cpu_jit_loops.py  decode attention over the blocks as stored; a decode layer's RoPE,
                        rotation, quantize-and-write and attention in one call
      cpu_jit_write.py  RoPE, rotation and quantize-and-write of one head-vector
      cpu_jit_layer.py  one sequence's whole decoder layer; small-batch linears
      cpu_jit_rows.py   RMSNorm
    cpu_codes.py      how the CPU torch path reads each format's stored codes and scales
    cpu_decode.py     CPU decode attention over the blocks as stored (compiled, or torch)
    cpu_prefill.py    CPU prefill / append attention and block mass in key tiles
    cpu_write.py      CPU quantize-and-write, one index_copy_ per stored tensor
    window_attention.py  attention over each sequence's exact window (its newest tokens,
                      kept exact by cache/exact_window.py) and its merge with the blocks'
    tiered.py         attention over age tiers: one pass per tier, merged by log-sum-exp

    kv_tiles.py       format constants for the kernels; shared tiles and online-softmax steps
    paged_decode.py   split-KV (flash-decoding) GQA decode kernel + launcher
    lse_merge.py      log-sum-exp merge of the decode kernel's split partials
    paged_prefill.py  causal prefill / append kernel + launcher
    quant_write.py    fused quantize-and-scatter of new K/V + launcher
    fp8_bits.py       fp8 <-> fp32 by bit operations (Triton helpers and torch twins)
    launch_checks.py  shape / dtype / stride checks shared by the launchers (no Triton)
    launch.py         the arguments the Triton attention launchers pass alike

Importing this package imports neither Triton nor numba; they load on first use.
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
