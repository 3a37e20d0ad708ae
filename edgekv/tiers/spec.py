"""``kv_tiers``: the syntax, and how one ``kv_memory`` is split between the tiers.

::

    kv_tiers = "fp16:128,int8:2048,int4"
                 |        |         '-- everything older: INT4 blocks (the last tier has no size)
                 |        '------------ the next 2,048 tokens: INT8 blocks
                 '--------------------- the newest 128 tokens also exact (the exact
                                        window, cache/exact_window.py; optional)

Sizes are in tokens and count from the newest token back. A block belongs to the first
tier whose reach holds its newest token, so a bounded tier of N tokens holds at most
``N + block_size - 1`` of them (its oldest block straddles the boundary). This module
imports no torch: the command line parses ``--kv-tiers`` with it. Format names are
checked against ``edgekv.names``; ``layout`` (which does import torch) checks the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekv.names import KV_FORMATS, KV_VARIANTS

EXACT = "fp16"  # a leading "fp16:N" is the exact window, not a stored tier
SEQS = 4  # sequences whose bounded tiers the pools are sized for (more demote early)


@dataclass(frozen=True)
class TierSpec:
    """``exact``: newest tokens kept exact (0: none); ``formats``: the stored tiers, newest
    first; ``tokens``: the size of each stored tier but the last."""

    exact: int
    formats: tuple[str, ...]
    tokens: tuple[int, ...]

    def __str__(self) -> str:
        parts = [f"{EXACT}:{self.exact}"] if self.exact else []
        parts += [f"{f}:{n}" for f, n in zip(self.formats, self.tokens, strict=False)]
        return ",".join([*parts, self.formats[-1]])


def parse_tiers(text: str) -> TierSpec:
    """``"fp16:128,int8:2048,int4"`` -> TierSpec; ValueError (one line) otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"kv_tiers must be a string such as 'fp16:128,int8:2048,int4', got "
                         f"{text!r}")
    entries = []
    for part in text.split(","):
        name, _, size = part.strip().partition(":")
        if size and not (size.isdigit() and int(size) > 0):
            raise ValueError(f"kv_tiers entry {part.strip()!r}: the size must be a positive "
                             f"number of tokens")
        entries.append((name.strip(), int(size) if size else None))
    exact = 0
    if entries[0][0] == EXACT and entries[0][1] is not None and len(entries) > 1:
        exact = entries.pop(0)[1]
    names = KV_FORMATS + KV_VARIANTS
    for name, _ in entries:
        if name not in names:
            raise ValueError(f"kv_tiers: unknown format {name!r}; choose from "
                             f"{', '.join(names)}")
    if len(entries) < 2:
        raise ValueError(f"kv_tiers {text!r} has one stored tier: give at least two (e.g. "
                         f"'int8:2048,int4'), or use kv_format and exact_window")
    if any(n is None for _, n in entries[:-1]) or entries[-1][1] is not None:
        raise ValueError(f"kv_tiers {text!r}: every tier but the last needs a size in "
                         f"tokens (name:N), and the last none (it holds everything older)")
    spec = TierSpec(exact, tuple(n for n, _ in entries), tuple(n for _, n in entries[:-1]))
    if exact > spec.tokens[0]:
        raise ValueError(f"kv_tiers {text!r}: the exact window ({exact}) must fit in the "
                         f"first stored tier ({spec.tokens[0]} tokens)")
    return spec


def tier_blocks(spec: TierSpec, budget: int, bytes_per_block: tuple[int, ...],
                block_size: int, chunk_tokens: int, seqs: int = SEQS) -> tuple[int, ...]:
    """Blocks of each stored tier out of ``budget`` bytes (``bytes_per_block[t]``: one
    block of tier t across all layers).

    A bounded tier gets room for ``seqs`` sequences' share of it (one block more each, for
    the straddling block), the newest also for one prefill chunk; bounded tiers take at
    most half of the budget (fewer sequences' worth then: more demote early, under
    pressure); the last tier takes the rest. ValueError if the bounded tiers of one
    sequence and one block of the last tier do not fit.
    """
    def bounded(n: int) -> list[int]:
        out = [n * (-(-tok // block_size) + 1) for tok in spec.tokens]
        out[0] += -(-chunk_tokens // block_size)
        return out

    def cost(blocks: list[int]) -> int:
        return sum(b * c for b, c in zip(blocks, bytes_per_block, strict=False))

    n = seqs
    while n > 1 and cost(bounded(n)) > budget // 2:
        n -= 1
    head = bounded(n)
    last = (budget - cost(head)) // bytes_per_block[-1]
    if last < 1:
        need = cost(head) + bytes_per_block[-1]
        raise ValueError(f"kv_memory of {budget:,} bytes cannot hold the tiers {spec} "
                         f"(one sequence's bounded tiers and one block of the last need "
                         f"{need:,} bytes): give more memory or smaller tiers")
    return (*head, last)


def due_tier(tokens: tuple[int, ...], age: int) -> int:
    """The tier of a block whose newest token has ``age`` tokens after it (``tokens``: the
    bounded tiers' sizes)."""
    reach = 0
    for t, n in enumerate(tokens):
        reach += n
        if age < reach:
            return t
    return len(tokens)


def tier_tokens(tokens: tuple[int, ...], length: int, block_size: int) -> tuple[int, ...]:
    """Tokens of a sequence of ``length`` in each stored tier once every block has aged
    into its tier."""
    out = [0] * (len(tokens) + 1)
    for i in range(-(-length // block_size)):
        newest = min((i + 1) * block_size, length) - 1
        out[due_tier(tokens, length - 1 - newest)] += min(block_size, length - i * block_size)
    return tuple(out)


@dataclass(frozen=True)
class TierLayout:
    """The stored tiers of a cache: one contiguous range of block ids per tier, newest
    tier first (its ids start at 0)::

        ids:  [0 ........ blocks[0]) [blocks[0] ..... blocks[0] + blocks[1]) ...
               tier 0 (formats[0])    tier 1 (formats[1])

    ``tokens[t]``: tier t's size (every tier but the last)."""

    formats: tuple[str, ...]
    tokens: tuple[int, ...]
    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.formats)
        if n < 2 or len(self.tokens) != n - 1 or len(self.blocks) != n or \
                min(self.blocks) < 1 or min(self.tokens) < 1:
            raise ValueError(f"inconsistent tier layout {self}")

    @property
    def offsets(self) -> tuple[int, ...]:
        """First block id of each tier."""
        out = [0]
        for b in self.blocks[:-1]:
            out.append(out[-1] + b)
        return tuple(out)

    def due(self, age: int) -> int:
        """The tier of a block whose newest token has ``age`` tokens after it."""
        return due_tier(self.tokens, age)
