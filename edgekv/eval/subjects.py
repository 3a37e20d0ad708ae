"""What is measured: one configuration under test (a KV format, a policy and budget, or a
peer's cache), behind one small interface the runner drives.

``EdgeKVSubject`` is an ``edgekv.LLM``; ``peers.HFSubject`` is a transformers model with
one of its caches. Both score windows teacher-forced and continue prompts greedily.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod

import torch


class Subject(ABC):
    """One configuration under test.

    Contract: ``logits(ids, decode)`` returns next-token logits (T, vocab) fp32 for the
    T tokens of ``ids``, teacher-forced, from a fresh cache (nothing carries over between
    calls). ``decode=True`` feeds the tokens one at a time, so each reads its history
    from the cache exactly as generation does; ``decode=False`` is one prefill.
    ``greedy(prompts, n)`` returns n greedy tokens per prompt (EOS does not stop it).
    ``prefill_reflects_cache`` is False where a prefill never reads the stored form
    (transformers' quantized caches, which attend over the unquantized prompt) or where
    the configuration acts only between tokens (eviction): such subjects report the
    decode perplexity only.
    """

    name: str  # the row's ``format``
    backend: str = "edgekv"
    eviction: str | None = None
    kv_budget: int | None = None  # tokens one sequence may keep cached
    exact_window: int | None = 0  # newest tokens kept unquantized (None: not applicable)
    tiers: str | None = None  # age tiers (LLM(kv_tiers=...)), or None
    prefill_reflects_cache: bool = True
    bytes_per_token: int | None = None  # KV bytes of one token, all layers (None: unknown)
    note: str = ""  # how this configuration differs from what its name says, if it does

    @abstractmethod
    def logits(self, ids: list[int], decode: bool) -> torch.Tensor:
        """(T, vocab) fp32 next-token logits of every position of ``ids``."""

    @abstractmethod
    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        """``max_new`` greedy tokens after each prompt."""

    def close(self) -> None:  # noqa: B027  (optional hook: most subjects hold nothing)
        """Release the model and its memory."""


def window_bytes(cache_config, window: int, exact: int = 0) -> int:
    """KV bytes one sequence of ``window`` tokens holds: its blocks' (with age tiers, each
    block in the tier its age puts it in), plus the exact ring's fp16 copy of its newest
    tokens."""
    from edgekv.quant import get_format
    from edgekv.tiers.spec import tier_tokens

    c = cache_config
    per = [c.tier(t).bytes_per_token for t in range(len(c.tiers.formats))] \
        if c.tiers is not None else [c.bytes_per_token]  # per-layer formats summed
    tokens = tier_tokens(c.tiers.tokens, window, c.block_size) if c.tiers is not None \
        else (window,)
    fp16 = get_format("fp16").bytes_per_token(c.num_kv_heads, c.head_dim) * c.num_layers
    return sum(n * b for n, b in zip(tokens, per, strict=True)) + min(exact, window) * fp16


class EdgeKVSubject(Subject):
    """An ``edgekv.LLM`` over a cache of ``kv_format``, optionally with eviction."""

    def __init__(self, model, kv_format: str, kv_memory: int, *, eviction: str | None = None,
                 kv_budget: int | None = None, block_size: int = 16, dtype: str = "float32",
                 device: str | None = None, seed: int = 0, max_num_seqs: int = 64,
                 decode_chunk: int = 1, exact_window: int = 0, kv_tiers: str | None = None,
                 window: int | None = None):
        """``kv_tiers``: age tiers instead of ``kv_format`` (the row is named by them);
        ``window``: the tokens a decode window holds, over which the bytes of the exact
        window and of the tiers are averaged."""
        from edgekv import LLM

        kwargs = {}
        if eviction is not None:  # the eviction contract: LLM(eviction=NAME, max_kv_tokens=N)
            kwargs = {"eviction": eviction, "max_kv_tokens": kv_budget}
        if exact_window:
            kwargs["exact_window"] = exact_window
        if kv_tiers is not None:  # the newest tier holds a prefill chunk: one window's
            kwargs.update(kv_tiers=kv_tiers, max_num_batched_tokens=window)
            kv_format = "int8"  # the default: the tiers name the formats
        torch.manual_seed(seed)
        self.llm = LLM(model, kv_format=kv_format, kv_memory=kv_memory, block_size=block_size,
                       device=device, dtype=dtype, seed=seed, max_num_seqs=max_num_seqs,
                       **kwargs)
        self.name, self.eviction, self.kv_budget = kv_format, eviction, kv_budget
        self.exact_window = exact_window
        self.tiers = kv_tiers
        # a prefill reads its own chunk's blocks before any is demoted: tiers and eviction
        # only show token by token
        self.prefill_reflects_cache = eviction is None and kv_tiers is None
        self.decode_chunk = decode_chunk  # tokens per step of logits(decode=True)
        cc = self.llm.cache_config
        self.bytes_per_token = cc.bytes_per_token
        if window and (exact_window or kv_tiers):  # what a window's cache holds, per token
            exact = self.llm.engine.exact_window.tokens if self.llm.engine.exact_window else 0
            self.bytes_per_token = window_bytes(cc, window, exact) // window
        if kv_tiers is not None:
            self.name = f"tiers {kv_tiers}"
            self.exact_window = 0  # in the name
        auto = self.llm.kv_auto
        if auto is not None:  # what the probe chose and predicted
            self.note = (f"{self.llm.cache_config.kv_format}; predicted KL "
                         f"{auto.predicted_kl:.3g}")

    def logits(self, ids: list[int], decode: bool) -> torch.Tensor:
        chunk = self.decode_chunk if decode else None
        return self.llm.score(ids, chunk_size=chunk).float().cpu()

    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        from edgekv import SamplingParams

        if not prompts or max_new == 0:
            return [[] for _ in prompts]
        params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
        return [list(o.token_ids) for o in self.llm.generate(prompts, params)]

    def close(self) -> None:
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
