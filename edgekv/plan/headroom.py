"""Memory a GPU needs besides weights and the KV pool: the headroom model.

Estimates, not measurements: each term is sized for the worst moment of a step, and the
terms add up (they can coexist). With h = hidden size, i = intermediate size, Hq/Hkv =
query/KV heads, D = head_dim, V = vocab, C = prefill chunk (tokens one step computes,
``max_num_batched_tokens``: 2048 on a GPU), S = sequences decoded together:

    cuda_context   CUDA_CONTEXT_BYTES: the driver context, loaded kernels, cuBLAS/Triton
                   workspaces. Only counted when planning from a card's TOTAL memory;
                   free memory read after loading a model has already paid for it.
    activations    C * max(2h + 3i, 3h + (2Hq + 2Hkv) * D) * 2 bytes * ACTIVATION_FACTOR:
                   the widest point of one layer for one chunk (MLP: residual, normed
                   input, gate, up, their product; attention: residual, normed input, q,
                   k, v, attention output, o-projection), in 16-bit, times a factor for
                   fp32 upcasts (norms, softmax statistics) and allocator rounding.
                   Layers run one after another, so one layer's peak is the model's.
                   The fused kernels never materialise a (tokens x context) score matrix.
    logits         S * V * 4 bytes * 2: fp32 logits of the sampled rows, and the sampler's
                   probabilities.
    dequant        largest Linear weight * 2 bytes, for int8/nf4 weights: bitsandbytes
                   dequantizes one weight to 16-bit for a prefill matmul.
    fragmentation  FRAGMENTATION_SHARE of the memory being divided: the caching
                   allocator's slack between differently sized blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekv.models import ModelConfig

from .weights import HALF_BYTES, largest_linear

CUDA_CONTEXT_BYTES = 512 * 2**20
ACTIVATION_FACTOR = 2
FRAGMENTATION_SHARE = 0.03
PREFILL_CHUNK = {"cuda": 2048, "cpu": 512}  # the engine's default max_num_batched_tokens


@dataclass(frozen=True)
class Headroom:
    """Bytes held back from the KV pool, by cause (see the module docstring)."""

    cuda_context: int
    activations: int
    logits: int
    dequant: int
    fragmentation: int

    @property
    def total(self) -> int:
        return (self.cuda_context + self.activations + self.logits + self.dequant
                + self.fragmentation)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def activation_bytes(cfg: ModelConfig, chunk_tokens: int) -> int:
    """Peak activation bytes of one layer computing ``chunk_tokens`` tokens."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    mlp = 2 * h + 3 * i
    attn = 3 * h + (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * d
    return chunk_tokens * max(mlp, attn) * HALF_BYTES * ACTIVATION_FACTOR


def headroom(cfg: ModelConfig, memory: int, *, quantized_weights: bool, chunk_tokens: int,
             num_seqs: int, include_context: bool) -> Headroom:
    """The headroom for running ``cfg`` within ``memory`` bytes (total or free).

    ``quantized_weights``: int8/nf4 weights (adds the dequantization buffer);
    ``num_seqs``: sequences sampled per step; ``include_context``: ``memory`` is a card's
    total, so the CUDA context must come out of it too.
    """
    if chunk_tokens <= 0 or num_seqs <= 0:
        raise ValueError(f"chunk_tokens and num_seqs must be positive, got {chunk_tokens}, "
                         f"{num_seqs}")
    return Headroom(
        cuda_context=CUDA_CONTEXT_BYTES if include_context else 0,
        activations=activation_bytes(cfg, chunk_tokens),
        logits=num_seqs * cfg.vocab_size * 4 * 2,
        dequant=largest_linear(cfg) * HALF_BYTES if quantized_weights else 0,
        fragmentation=int(memory * FRAGMENTATION_SHARE),
    )
