"""What fits on a GPU: for each (weights, KV format) pair, the KV pool left and its context.

For a card of M bytes, weights mode w and KV format f::

    kv_budget(w)   = M - weights(w) - headroom(w)                 (weights.py, headroom.py)
    blocks(w, f)   = kv_budget(w) // (block_size * bytes_per_token(f))
    max_context    = min(blocks // batch * block_size, the model's max_position)
    max_batch      = blocks // ceil(context / block_size)         sequences of `context`
    fits           = max_batch >= batch                           no eviction needed

``bytes_per_token(f)`` is the format's exact K+V cost over all layers, scales included
(``edgekv.quant``), the number the runtime's CacheConfig uses, so a plan's block count is
the one ``LLM(kv_memory=kv_budget)`` allocates.

Recommendation: among the pairs that hold ``batch`` sequences of ``context`` tokens
without eviction, the least-quantized weights, then the most accurate KV format (in the
order the format measurements of README rank them: fp16, bf16, int8, fp8, fp8_e5m2,
int4). If none does, the pair with the longest context, which then needs eviction.

The KV choice (``kv_choice``): for each weights mode, the budget controller
(controller.py) sizes every storage candidate, uniform, per-layer and age tiers, and
keeps the one with the least predicted KL that holds the request; the least-quantized
weights whose choice holds it win (else offload, else eviction: see ``choose_weights``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekv.config import CacheConfig
from edgekv.units import MiB, parse_memory

from .controller import Controller, Decision
from .headroom import PREFILL_CHUNK, Headroom, headroom
from .resolve import ModelSpec
from .weights import WEIGHT_MODES, WeightMemory, weight_memory

KV_QUALITY_ORDER: tuple[str, ...] = ("fp16", "bf16", "int8", "fp8", "fp8_e5m2", "int4")
TIER_SCRATCH = 2 * 2  # bytes per token x head x dim a tiered prefill reads: K and V, fp16


@dataclass(frozen=True)
class PlanRow:
    """One (weights, KV format) pair on the card. Budgets may be negative (no room)."""

    weights: str
    kv_format: str
    weight_bytes: int
    headroom_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    kv_blocks: int
    kv_tokens: int  # tokens the pool holds, all sequences together
    max_context: int  # per sequence with `batch` sequences, capped at the model's maximum
    max_batch: int  # sequences of the requested context that fit
    fits_weights: bool  # weights and headroom leave room for at least one KV block
    fits_context: bool  # `batch` sequences of `context` tokens fit without eviction

    @property
    def status(self) -> str:
        if self.kv_budget_bytes <= 0:
            return "weights do not fit"
        if not self.fits_weights:
            return "no room for KV"
        return "fits" if self.fits_context else "needs eviction"


@dataclass(frozen=True)
class Recommendation:
    row: PlanRow
    reason: str


@dataclass(frozen=True)
class KVRecommendation:
    """The weights mode and the controller's decision for the memory it leaves."""

    weights: str
    decision: Decision
    reason: str


@dataclass(frozen=True)
class MemoryPlan:
    spec: ModelSpec
    gpu_memory: int
    context: int
    batch: int
    block_size: int
    chunk_tokens: int
    weights: dict[str, WeightMemory]
    headroom: dict[str, Headroom]  # per weights mode (quantized ones add a dequant buffer)
    kv_bytes_per_token: dict[str, int]
    rows: tuple[PlanRow, ...]
    recommendation: Recommendation | None  # the table's pair (uniform formats only)
    decisions: dict[str, Decision]  # per weights mode with room for KV
    kv_choice: KVRecommendation | None  # what the plan recommends (--json: recommendation)

    def row(self, weights: str, kv_format: str) -> PlanRow:
        for r in self.rows:
            if (r.weights, r.kv_format) == (weights, kv_format):
                return r
        raise KeyError((weights, kv_format))

    def to_dict(self) -> dict:
        """Plain data for ``--json``: every number of the plan, in bytes and tokens."""
        c = self.spec.config
        return {
            "model": {"name": self.spec.name, "source": self.spec.source,
                      "num_layers": c.num_layers, "hidden_size": c.hidden_size,
                      "intermediate_size": c.intermediate_size, "num_heads": c.num_heads,
                      "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                      "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_word_embeddings,
                      "max_position": c.max_position},
            "request": {"gpu_memory": self.gpu_memory, "context": self.context,
                        "batch": self.batch, "block_size": self.block_size,
                        "prefill_chunk": self.chunk_tokens},
            "weights": {m: {**asdict(w), "total_bytes": w.total_bytes}
                        for m, w in self.weights.items()},
            "headroom": {m: h.to_dict() for m, h in self.headroom.items()},
            "kv_bytes_per_token": dict(self.kv_bytes_per_token),
            "configurations": [{**asdict(r), "status": r.status} for r in self.rows],
            "recommendation": None if self.kv_choice is None else {
                "weights": self.kv_choice.weights, "reason": self.kv_choice.reason,
                **self.kv_choice.decision.to_dict()},
            "notes": list(self.spec.notes),
        }


def kv_capacity(kv_budget: int, bytes_per_token: int, block_size: int) -> tuple[int, int]:
    """(blocks, tokens) a KV budget holds: whole blocks only, none for a negative budget."""
    blocks = max(kv_budget, 0) // (bytes_per_token * block_size)
    return blocks, blocks * block_size


def plan_memory(spec: ModelSpec, gpu_memory: int | str, context: int | None = None,
                batch: int = 1, block_size: int = 16,
                chunk_tokens: int = PREFILL_CHUNK["cuda"],
                kv_formats: tuple[str, ...] = KV_QUALITY_ORDER,
                weight_modes: tuple[str, ...] = WEIGHT_MODES, quality=None,
                probe=None) -> MemoryPlan:
    """Plan ``spec`` on a card of ``gpu_memory`` (total bytes or "8GiB").

    ``context``: tokens per sequence to hold (default: the model's maximum; more raises
    ValueError); ``batch``: sequences held at once. ``quality``: the QualityModel that
    scores the KV choices (default: the demo model's prior, ``edgekv.auto.quality``);
    ``probe``: this model's ProbeResult, which adds per-layer candidates. Reads no
    weights, allocates nothing.
    """
    cfg = spec.config
    memory = parse_memory(gpu_memory)
    if memory < 2**28:  # no GPU has under 256 MiB
        if isinstance(gpu_memory, str) and not gpu_memory.strip().isdigit():
            raise ValueError(f"GPU memory {gpu_memory!r} is under 256 MiB: no GPU is that "
                             f"small; give the card's memory, e.g. '8GiB'")
        raise ValueError(f"GPU memory {gpu_memory!r} is {memory:,} bytes: give a unit, "
                         f"e.g. '8GiB'")  # a unit was most likely left off
    context = cfg.max_position if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if context > cfg.max_position:
        raise ValueError(f"context {context:,} is beyond {spec.name}'s maximum of "
                         f"{cfg.max_position:,} tokens (max_position_embeddings)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive number of sequences, got {batch!r}")
    per_token = {}
    for f in kv_formats:  # CacheConfig checks block_size and that f can store head_dim
        per_token[f] = CacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1,
                                   block_size, f).bytes_per_token
    weights = {m: weight_memory(cfg, m) for m in weight_modes}
    rooms = {m: headroom(cfg, memory, quantized_weights=m != "fp16", chunk_tokens=chunk_tokens,
                         num_seqs=batch, include_context=True) for m in weight_modes}
    blocks_per_seq = -(-context // block_size)
    rows = []
    for m in weight_modes:
        budget = memory - weights[m].total_bytes - rooms[m].total
        for f in kv_formats:
            blocks, tokens = kv_capacity(budget, per_token[f], block_size)
            max_batch = blocks // blocks_per_seq
            rows.append(PlanRow(
                weights=m, kv_format=f, weight_bytes=weights[m].total_bytes,
                headroom_bytes=rooms[m].total, kv_budget_bytes=budget,
                kv_bytes_per_token=per_token[f], kv_blocks=blocks, kv_tokens=tokens,
                max_context=min(blocks // batch * block_size, cfg.max_position),
                max_batch=max_batch, fits_weights=budget > 0 and blocks > 0,
                fits_context=max_batch >= batch))
    if quality is None:
        from edgekv.auto.quality import prior

        quality = prior(cfg.num_layers)
    decisions = {}
    for m in weight_modes:
        budget = (memory - weights[m].total_bytes - rooms[m].total) // MiB * MiB
        if budget > 0:  # whole MiB: the --kv-memory the plan prints holds what it sized
            decisions[m] = Controller(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, budget,
                                      context, batch, quality, block_size, chunk_tokens,
                                      probe, scratch_per_token=TIER_SCRATCH * cfg.num_kv_heads
                                      * cfg.head_dim).decide()
    return MemoryPlan(spec, memory, context, batch, block_size, chunk_tokens, weights, rooms,
                      per_token, tuple(rows), recommend(rows, context, batch), decisions,
                      choose_weights(decisions, context, batch))


def choose_weights(decisions: dict[str, Decision], context: int,
                   batch: int) -> KVRecommendation | None:
    """The least-quantized weights whose KV choice holds ``batch`` x ``context`` (weights
    first: their cost is not measured here, the KV's is predicted); else the first whose
    choice holds one sequence with the others offloaded; else the one whose cheapest
    format keeps the most tokens, with eviction."""
    req = f"{batch} x {context:,} tokens"
    for needs, why in (("", f"the least-quantized weights whose KV holds {req}; the KV "
                            f"storage with the least predicted KL that does"),
                       ("offload", f"no weights leave room for {req}; one sequence fits, "
                                   f"the others wait in host memory (offload_memory)")):
        for m, d in decisions.items():
            if d.choice is not None and d.needs == needs:
                return KVRecommendation(m, d, why)
    usable = [(m, d) for m, d in decisions.items() if d.choice is not None]
    if not usable:
        return None
    m, d = max(usable, key=lambda md: md[1].choice.tokens_per_seq)
    return KVRecommendation(m, d, f"no weights leave room for one sequence of {context:,} "
                                  f"tokens; this keeps the most ({d.choice.tokens_per_seq:,} "
                                  f"per sequence): eviction must keep each sequence within it")


def recommend(rows: list[PlanRow], context: int, batch: int) -> Recommendation | None:
    """The pair to use (module docstring), or None when no pair leaves room for KV."""
    def quality(r: PlanRow) -> tuple[int, int]:
        kv_order = ("fp32", *KV_QUALITY_ORDER)  # formats outside it (variants) rank last
        kv = kv_order.index(r.kv_format) if r.kv_format in kv_order else len(kv_order)
        return WEIGHT_MODES.index(r.weights), kv

    fitting = [r for r in rows if r.fits_context]
    if fitting:
        best = min(fitting, key=quality)
        return Recommendation(best, f"the least-quantized weights and KV that hold {batch} x "
                                    f"{context:,} tokens without eviction")
    usable = [r for r in rows if r.fits_weights and r.max_context > 0]
    if not usable:
        return None
    best = min(usable, key=lambda r: (-r.max_context, quality(r)))
    return Recommendation(best, f"no pair holds {batch} x {context:,} tokens; this one holds "
                                f"the most ({best.max_context:,} per sequence): eviction must "
                                f"keep each sequence within it")
