"""The names users type (``--kv``, ``--eviction``, ``edgekv plan --model``), without torch.

The command line builds its choices from these tuples so that ``edgekv --help`` and the
parsing of every subcommand import neither torch nor transformers. Each tuple mirrors a
registry that does import torch; tests/test_startup.py checks that they stay equal:

    KV_FORMATS         == edgekv.quant.FORMATS
    KV_VARIANTS        == edgekv.quant.VARIANTS
    EVICTION_POLICIES  == edgekv.eviction.EVICTION_POLICIES
    KNOWN_MODELS       == tuple(edgekv.plan.KNOWN_MODELS)
"""

from __future__ import annotations

KV_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8", "fp8_e5m2", "int4")
KV_VARIANTS: tuple[str, ...] = ("int8_norot", "int4_norot", "int4_sym", "int4_g32", "int4_nl")
EVICTION_POLICIES: tuple[str, ...] = ("h2o", "snapkv", "streaming")
KNOWN_MODELS: tuple[str, ...] = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b",
                                 "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "mistral-7b")


def renamed(new, old, new_name: str, old_name: str, unset=None):
    """The value of a setting given under its ``new_name`` or its former ``old_name``
    (``unset``: not given). Both given with different values: ValueError (one line)."""
    if old is None or old == unset:
        return new
    if new is not None and new != unset and new != old:
        raise ValueError(f"{old_name} is the old name of {new_name}: give one of them "
                         f"(got {new_name}={new!r} and {old_name}={old!r})")
    return old
