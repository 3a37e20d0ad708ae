"""Frozen configuration of the paged KV cache (memory sizes are parsed in edgekv.units)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgekv.quant import KVFormat, get_format
from edgekv.tiers.spec import TierLayout, TierSpec, tier_blocks
from edgekv.units import parse_memory as parse_memory  # re-exported: edgekv.config's API

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256


def format_names(kv_format: str | Sequence[str]) -> list[str]:
    """The names in ``kv_format``: one, or one per layer as a sequence or comma-separated
    (``"int8,int4,int4,int4"``), each checked; ValueError (one line) otherwise."""
    if not isinstance(kv_format, str) and not (
            isinstance(kv_format, Sequence) and all(isinstance(n, str) for n in kv_format)):
        raise ValueError(f"kv_format must be a format name or one per layer, got "
                         f"{kv_format!r}")
    names = [n.strip() for n in (kv_format.split(",") if isinstance(kv_format, str)
                                 else kv_format)]
    for n in dict.fromkeys(names):
        get_format(n)
    return names


def layer_formats(kv_format: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """One format name per layer (``format_names``, one name repeated for every layer).
    Raises ValueError (one line) on an unknown name or a count that is not
    ``num_layers``."""
    names = format_names(kv_format)
    if len(names) == 1:
        return tuple(names) * num_layers
    if len(names) != num_layers:
        raise ValueError(f"kv_format lists {len(names)} formats for {num_layers} layers: give "
                         f"one format, or one per layer")
    return tuple(names)


def join_formats(names: Sequence[str]) -> str:
    """The canonical ``kv_format`` string of per-layer names: one name when they agree."""
    return names[0] if len(set(names)) == 1 else ",".join(names)


def describe_formats(kv_format: str) -> str:
    """A short name for people: "int8", or "int4_nl x3 + int8 x1" where layers differ."""
    names = kv_format.split(",")
    if len(set(names)) == 1:
        return names[0]
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return " + ".join(f"{n} x{c}" for n, c in counts.items())


def describe_kv(stats: dict) -> str:
    """What a cache stores, for people, from its ``kv_stats()``: ``describe_formats``, or
    with age tiers their spec ("tiers fp16:128,int8:2048,int4")."""
    tiers = stats.get("tiers")
    if not tiers:
        return describe_formats(stats["kv_format"])
    parts = [f"fp16:{stats['exact_window_tokens']}"] if stats.get("exact_window_tokens") else []
    parts += [t["format"] if t["tokens_max"] is None else f"{t['format']}:{t['tokens_max']}"
              for t in tiers]
    return "tiers " + ",".join(parts)


def kv_bytes_per_token(kv_format: str | Sequence[str], num_layers: int, num_kv_heads: int,
                       head_dim: int) -> int:
    """K+V bytes of one token across all layers, scales included."""
    return sum(get_format(n).bytes_per_token(num_kv_heads, head_dim)
               for n in layer_formats(kv_format, num_layers))


@dataclass(frozen=True)
class CacheConfig:
    """Shape and storage of the paged KV cache. Built once, passed down, never mutated.

    Block ids are shared by all layers: a block holds ``block_size`` consecutive tokens of
    one sequence in every layer, so one block costs ``bytes_per_block`` across the model.
    ``kv_format`` is one format name, or one per layer comma-separated (each layer owns
    its storage; a block's bytes are the sum over layers); ``formats`` has one per layer.
    ``tiers`` (age tiers, edgekv/tiers): the block ids split into one range per stored
    tier; ``kv_format`` is then the newest tier's, where new tokens are written, and
    ``num_blocks`` counts every tier's.
    """

    num_layers: int
    num_kv_heads: int  # only KV heads are stored (GQA): query heads share them
    head_dim: int
    num_blocks: int
    block_size: int = 16  # tokens per block; a power of two so kernels tile it exactly
    kv_format: str = "int8"
    tiers: TierLayout | None = None

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "num_blocks"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got "
                                 f"{getattr(self, field)!r}")
        bs = self.block_size
        if not isinstance(bs, int) or not (MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE) or bs & (
            bs - 1
        ):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, "
                             f"{MAX_BLOCK_SIZE}], got {bs!r}")
        names = layer_formats(self.kv_format, self.num_layers)  # ValueError: name, count
        object.__setattr__(self, "kv_format", join_formats(names))  # canonical form
        for f in dict.fromkeys(names):
            get_format(f).check_head_dim(self.head_dim)  # ValueError on a shape it can't store
        if self.tiers is not None:
            if self.mixed or self.kv_format != self.tiers.formats[0] or \
                    self.num_blocks != sum(self.tiers.blocks):
                raise ValueError(f"tiers {self.tiers} do not match kv_format "
                                 f"{self.kv_format!r} and {self.num_blocks} blocks")
            for f in self.tiers.formats:
                get_format(f).check_head_dim(self.head_dim)

    def tier(self, t: int) -> CacheConfig:
        """Stored tier ``t`` alone: its format and its blocks (ids local to the tier)."""
        assert self.tiers is not None
        return CacheConfig(self.num_layers, self.num_kv_heads, self.head_dim,
                           self.tiers.blocks[t], self.block_size, self.tiers.formats[t])

    @property
    def formats(self) -> tuple[KVFormat, ...]:
        """The format of each layer."""
        return tuple(get_format(n) for n in layer_formats(self.kv_format, self.num_layers))

    @property
    def mixed(self) -> bool:
        """Whether layers differ in format."""
        return "," in self.kv_format

    @property
    def format(self) -> KVFormat:
        """The format of every layer; ValueError where layers differ (read ``formats``)."""
        if self.mixed:
            raise ValueError(f"kv_format {self.kv_format!r} differs by layer: read formats")
        return get_format(self.kv_format)

    @property
    def bytes_per_token(self) -> int:
        """K+V bytes of one token across all layers, scales included."""
        return kv_bytes_per_token(self.kv_format, self.num_layers, self.num_kv_heads,
                                  self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def bytes_total(self) -> int:
        if self.tiers is not None:
            return sum(self.tier(t).bytes_total for t in range(len(self.tiers.blocks)))
        return self.num_blocks * self.bytes_per_block

    @classmethod
    def for_budget(cls, kv_memory: int | str, num_layers: int, num_kv_heads: int,
                   head_dim: int, block_size: int = 16, kv_format: str = "int8") -> CacheConfig:
        """The config with as many blocks as fit in ``kv_memory`` bytes (at least one)."""
        budget = parse_memory(kv_memory)
        kv_format = join_formats(layer_formats(kv_format, num_layers))
        per_block = block_size * kv_bytes_per_token(kv_format, num_layers, num_kv_heads,
                                                    head_dim)
        if budget < per_block:
            raise ValueError(f"kv_memory {budget} bytes is smaller than one {kv_format} block "
                             f"of {block_size} tokens across {num_layers} layers "
                             f"({per_block} bytes)")
        return cls(num_layers, num_kv_heads, head_dim, budget // per_block, block_size,
                   kv_format)

    @classmethod
    def for_tiers(cls, kv_memory: int | str, num_layers: int, num_kv_heads: int,
                  head_dim: int, spec: TierSpec, block_size: int = 16,
                  chunk_tokens: int = 512) -> CacheConfig:
        """The tiered config whose pools together fit in ``kv_memory`` bytes
        (``tiers.spec.tier_blocks`` splits them)."""
        budget = parse_memory(kv_memory)
        per_block = tuple(block_size * kv_bytes_per_token(f, num_layers, num_kv_heads,
                                                          head_dim) for f in spec.formats)
        blocks = tier_blocks(spec, budget, per_block, block_size, chunk_tokens)
        layout = TierLayout(spec.formats, spec.tokens, blocks)
        return cls(num_layers, num_kv_heads, head_dim, sum(blocks), block_size,
                   spec.formats[0], layout)
