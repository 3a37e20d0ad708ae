"""The budget controller: the KV storage with the least predicted KL that holds the request.

Given the bytes left for KV, ``batch`` sequences of ``context`` tokens and a quality model
(``edgekv.auto.quality``: this model's probe, or the demo model's prior), each candidate
is sized as the runtime allocates it (for the prefill chunk and block size given) and
scored by its predicted KL per token at the end of the context:

    uniform   one format everywhere (the quality model's formats: fp16, int8, int4_nl, int4;
              ``formats`` narrows them)
    layers    one format per layer (``kv_format="auto"``'s knapsack at budget / tokens
              bytes per token; only with a probe of this model: a prior's layers are not
              this model's)
    tiers     E exact, the next M tokens int8, the rest int4 or int4_nl, E in {0, 128},
              M the most that fits (pools split by ``tiers.spec.tier_blocks``; the exact
              window's fp16 rings, which the runtime allocates beside ``kv_memory``, and
              ``scratch_per_token`` x batch x context, the history a tiered prefill
              reads into one 16-bit storage per layer, are taken out of the budget first,
              so the choice's ``kv_memory`` is the pools')

The choice: the least predicted KL among those that hold every sequence (fewer bytes on a
tie). None holds them: if one sequence fits, the others can wait in host memory
(``offload_memory``, for a uniform format); if not even one does, the cheapest format's
context is the most a sequence keeps and eviction must hold it there (at least two
blocks: else no choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgekv.auto.quality import QualityModel, delta_ppl, tier_bands, uniform_bands
from edgekv.config import join_formats, kv_bytes_per_token
from edgekv.quant import get_format, stores
from edgekv.tiers.spec import TierSpec, tier_blocks
from edgekv.units import mib, size_arg

EXACT_WINDOWS = (0, 128)
MIDDLE = "int8"
LAST = ("int4", "int4_nl")
CPU_CHUNK = 512  # the engine's prefill chunk on a CPU: tiers must fit either split


@dataclass(frozen=True)
class KVChoice:
    """One candidate storage, sized for the request. ``bytes_per_token``: the pools' bytes
    (rings included) over the tokens they hold for the request; ``predicted_kl``: nats per
    token at the end of the context (None where the quality model lacks a format)."""

    kind: str  # "uniform", "layers" or "tiers"
    kv_format: str  # the format, or one per layer, or the tiers' spec
    kv_memory: int  # LLM's kv_memory: the pools (the exact window's rings come on top)
    bytes_per_token: float
    tokens_per_seq: int  # the most one sequence holds (capped at the request's context)
    fits: bool  # batch x context without eviction or offload
    predicted_kl: float | None

    @property
    def delta_ppl(self) -> float | None:
        return None if self.predicted_kl is None else delta_ppl(self.predicted_kl)

    @property
    def flags(self) -> str:
        """The command-line options that select it."""
        opt = "--kv-tiers" if self.kind == "tiers" else "--kv"
        return f"{opt} {self.kv_format} --kv-memory {size_arg(self.kv_memory)}"

    @property
    def label(self) -> str:
        return {"tiers": "tiers ", "layers": "per layer "}.get(self.kind, "") + self.kv_format

    def summary(self, context: int, source: str) -> str:
        """One line: what was chosen for the context, its bytes and predicted quality."""
        kl = "" if self.predicted_kl is None else \
            f", predicted KL {self.predicted_kl:.2e} (Δppl {100 * self.delta_ppl:+.3f}%)"
        return (f"kv_format=auto for {context:,} tokens in {mib(self.kv_memory, 1)}: "
                f"{self.label}, {self.bytes_per_token:,.0f} B/token{kl}; {source}")


@dataclass(frozen=True)
class Decision:
    """The chosen storage and what else is needed to hold the request."""

    choice: KVChoice | None
    candidates: tuple[KVChoice, ...]
    needs: str  # "" (fits), "offload" or "eviction"
    offload_bytes: int  # host memory for the sequences that do not fit (needs == "offload")
    source: str  # where the predicted quality comes from

    def to_dict(self) -> dict:
        def row(c: KVChoice) -> dict:
            return {"kind": c.kind, "kv_format": c.kv_format, "kv_memory": c.kv_memory,
                    "bytes_per_token": round(c.bytes_per_token, 1),
                    "tokens_per_seq": c.tokens_per_seq, "fits": c.fits,
                    "predicted_kl": c.predicted_kl, "predicted_delta_ppl": c.delta_ppl}
        return {"choice": None if self.choice is None else row(self.choice),
                "needs": self.needs or None, "offload_bytes": self.offload_bytes,
                "quality_source": self.source, "candidates": [row(c) for c in self.candidates]}



class Controller:
    """Sizes and scores candidates for one model shape and request (module docstring)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, budget: int,
                 context: int, batch: int, quality: QualityModel, block_size: int = 16,
                 chunk_tokens: int = 2048, probe=None, tiers: bool = True,
                 scratch_per_token: int = 0, formats: tuple[str, ...] | None = None):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.budget, self.context, self.batch = budget, context, batch
        self.quality, self.block_size, self.chunk = quality, block_size, chunk_tokens
        self.probe, self.allow_tiers = probe, tiers
        self.scratch = scratch_per_token * batch * context  # a tiered prefill's, one layer
        self.formats = tuple(f for f in quality.formats if formats is None or f in formats)
        self._bpt: dict[str, int] = {}

    def bpt(self, fmt: str) -> int:
        if fmt not in self._bpt:
            self._bpt[fmt] = kv_bytes_per_token(fmt, *self.shape)
        return self._bpt[fmt]

    def _kl(self, bands) -> float | None:
        formats = {f for layer in bands for _, _, f in layer}
        if not all(self.quality.covers(f) for f in formats):
            return None
        return self.quality.at(bands, self.context)

    def uniform(self, fmt: str) -> KVChoice:
        per_block = self.block_size * self.bpt(fmt)
        blocks = max(self.budget, 0) // per_block
        need = -(-self.context // self.block_size)
        per_seq = min(blocks // self.batch * self.block_size, self.context)
        return KVChoice("uniform", fmt, self.budget, self.bpt(fmt), per_seq,
                        blocks >= self.batch * need, self._kl([uniform_bands(fmt)]))

    def layers(self) -> KVChoice | None:
        """The per-layer knapsack within budget / (batch x context) bytes per token."""
        if self.probe is None:
            return None
        from edgekv.auto.assign import BudgetTooSmall, choose

        nl, nkv, hd = self.shape
        per_token = self.budget // (self.batch * -(-self.context // self.block_size)
                                    * self.block_size)
        lb = [get_format(f).bytes_per_token(nkv, hd) for f in self.probe.formats]
        try:
            a = choose(self.probe, lb, per_token)
        except BudgetTooSmall:
            return None
        if len(set(a.formats)) == 1:
            return None  # a uniform format: already a candidate
        fmt = join_formats(a.formats)
        c = self.uniform(fmt)
        return KVChoice("layers", fmt, c.kv_memory, c.bytes_per_token, c.tokens_per_seq,
                        c.fits, self._kl([uniform_bands(f) for f in a.formats]))

    def tiers(self, exact: int, middle_tokens: int, last: str,
              score: bool = True) -> KVChoice | None:
        """``fp16:E,int8:M,last`` sized as LLM(kv_tiers=...) sizes it; None if the pools
        cannot be split at all. ``score=False``: no predicted KL (sizing only)."""
        spec = TierSpec(exact, (MIDDLE, last), (middle_tokens,))
        rings = self.batch * exact * self.bpt("fp16")  # on top of LLM's kv_memory
        pools = (self.budget - rings - self.scratch) // 1024 * 1024
        per_block = tuple(self.block_size * self.bpt(f) for f in spec.formats)
        splits = []  # the pools as a GPU (this chunk) and a CPU (512) would split them
        for chunk in sorted({self.chunk, min(self.chunk, CPU_CHUNK)}):
            try:
                splits.append(tier_blocks(spec, pools, per_block, self.block_size, chunk))
            except ValueError:
                return None
        blocks = tuple(min(b) for b in zip(*splits, strict=True))
        # blocks of one sequence of `context` in each tier once aged: block i's newest
        # token is context - min((i + 1) * bs, context) tokens old, in tier 0 while < M
        n = -(-self.context // self.block_size)
        first = n - max(self.context - middle_tokens, 0) // self.block_size
        need = [first, n - first]
        fits = all(b >= self.batch * n for b, n in zip(blocks, need, strict=True))
        per_seq = self.context if fits else self._tier_context(blocks, spec)
        used = sum(n * pb for n, pb in zip(need, per_block, strict=True)) * self.batch + rings
        return KVChoice("tiers", str(spec), pools, used / (self.batch * self.context),
                        per_seq, fits, None if not score else self._kl(
                            [tier_bands(exact, spec.formats, spec.tokens, self.block_size)]))

    def _tier_context(self, blocks: tuple[int, ...], spec: TierSpec) -> int:
        """Tokens per sequence the pools hold (bounded tiers full, the last shared)."""
        head = -(-spec.tokens[0] // self.block_size) + 1
        if blocks[0] < self.batch * head:
            return blocks[0] // self.batch * self.block_size
        return spec.tokens[0] + blocks[1] // self.batch * self.block_size

    def best_tiers(self, exact: int, last: str) -> KVChoice | None:
        """The largest int8 middle tier that still holds the request (most int8: least KL)."""
        grid, m = [], max(self.block_size, exact + self.block_size)
        while m < self.context:
            grid.append(m)
            m = max(m + self.block_size, int(m * 1.03) // self.block_size * self.block_size)
        best = None  # (middle tokens, choice)
        for m in grid:
            c = self.tiers(exact, m, last, score=False)
            if c is not None and c.fits:
                best = (m, c)
        if best is None:
            return None
        lo, hi = best[0], next((m for m in grid if m > best[0]), self.context)
        while hi - lo > self.block_size:  # refine up to the next grid point
            mid = (lo + hi) // 2 // self.block_size * self.block_size
            c = self.tiers(exact, mid, last, score=False) if mid > lo else None
            if c is not None and c.fits:
                best, lo = (mid, c), mid
            else:
                hi = mid
        return self.tiers(exact, best[0], last)

    def decide(self) -> Decision:
        hd = self.shape[2]
        cands = [self.uniform(f) for f in self.formats if stores(f, hd)]
        layered = self.layers()
        if layered is not None:
            cands.append(layered)
        for e in EXACT_WINDOWS if self.allow_tiers else ():
            for last in LAST:
                if stores(last, hd) and stores(MIDDLE, hd):
                    c = self.best_tiers(e, last)
                    if c is not None:
                        cands.append(c)
        scored = [c for c in cands if c.fits and c.predicted_kl is not None]
        source = self.quality.source
        if scored:
            best = min(scored, key=lambda c: (c.predicted_kl, c.bytes_per_token))
            return Decision(best, tuple(cands), "", 0, source)
        uni = [c for c in cands if c.kind == "uniform"]
        seq_tokens = -(-self.context // self.block_size) * self.block_size
        one = [c for c in uni if max(self.budget, 0) // self.bpt(c.kv_format) >= seq_tokens]
        if one:  # one sequence fits: the others wait in host memory
            best = min(one, key=lambda c: (c.predicted_kl if c.predicted_kl is not None
                                           else math.inf, c.bytes_per_token))
            seq_bytes = -(-self.context // self.block_size) * self.block_size * \
                self.bpt(best.kv_format)
            waiting = self.batch - max(self.budget, 0) // seq_bytes
            return Decision(best, tuple(cands), "offload", waiting * seq_bytes, source)
        best = max(uni, key=lambda c: (c.tokens_per_seq, -c.bytes_per_token), default=None)
        if best is not None and best.tokens_per_seq < 2 * self.block_size:
            best = None  # eviction needs two blocks per sequence (sinks and window)
        return Decision(best, tuple(cands), "eviction", 0, source)
