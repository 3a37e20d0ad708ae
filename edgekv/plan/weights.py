"""Bytes of a model's weights in 16-bit, bitsandbytes int8 and bitsandbytes nf4.

The model is a Llama-style decoder (what ``edgekv.models`` runs). Per layer, seven Linear
weights (out x in):

    q (Hq*D x h)  k (Hkv*D x h)  v (Hkv*D x h)  o (h x Hq*D)
    gate (i x h)  up (i x h)  down (h x i)

plus two RMSNorms (h each), optional q/k/v biases (Qwen2: (Hq + 2*Hkv)*D) and q/k norms
(Qwen3: 2*D). Outside the layers: the embedding (V x h), the final norm (h) and lm_head
(V x h; no bytes of its own when tied to the embedding).

Quantized modes quantize only those seven Linear weights per layer, as EdgeKV's loader
(and transformers' bitsandbytes integration) do; the embedding, lm_head, norms and biases
stay in 16-bit (2 bytes each). Per quantized weight of n = out*in values:

    int8 (LLM.int8, ``Int8Params``): n bytes of codes + 4 * out bytes (one fp32 absmax per
         output row, ``SCB``)
    nf4 (``Params4bit``, blocksize 64, double quantization = bitsandbytes' default, which
         EdgeKV's loader keeps): n / 2 bytes of codes (two per byte)
         + ceil(n / 64) bytes (each block's absmax, itself quantized to 8 bits)
         + 4 * ceil(n / (64 * 256)) bytes (fp32 absmax of each 256 absmax values)
         + 4 + 64 + 1024 bytes per tensor (fp32 offset, the 16-value nf4 code and the
         256-value 8-bit code of the nested state)
         i.e. about 0.516 bytes per weight. Without double quantization (transformers'
         ``BitsAndBytesConfig`` default) the absmax costs 4 bytes per 64 weights instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekv.models import ModelConfig

WEIGHT_MODES: tuple[str, ...] = ("fp16", "int8", "nf4")  # "fp16": any 16-bit dtype
LLM_WEIGHTS = {"fp16": None, "int8": "int8", "nf4": "nf4"}  # -> LLM(weights=...)
HALF_BYTES = 2
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_TENSOR_STATE = 4 + 16 * 4 + 256 * 4  # offset, nf4 code, nested 8-bit code


def linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of the Linear weights of ONE decoder layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def kept_params(cfg: ModelConfig) -> int:
    """Parameters that stay 16-bit in every mode: embedding, lm_head (if untied), norms,
    biases."""
    h, d, n = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    per_layer = 2 * h
    if cfg.qkv_bias:
        per_layer += (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    if cfg.o_bias:
        per_layer += h
    if cfg.mlp_bias:
        per_layer += 2 * cfg.intermediate_size + h
    if cfg.qk_norm:
        per_layer += 2 * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + head + h + n * per_layer


def num_params(cfg: ModelConfig) -> int:
    """All parameters (a tied lm_head counted once)."""
    return kept_params(cfg) + cfg.num_layers * sum(o * i for o, i in linear_shapes(cfg))


def int8_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one bitsandbytes int8 weight: codes + one fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes nf4 weight of ``numel`` values (see the module docstring)."""
    blocks = -(-numel // NF4_BLOCK)
    codes = -(-numel // 2)
    if not double_quant:
        return codes + 4 * blocks + 16 * 4
    return codes + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + NF4_TENSOR_STATE


@dataclass(frozen=True)
class WeightMemory:
    """What a model's weights take in one mode."""

    mode: str  # "fp16" | "int8" | "nf4"
    quantized_params: int  # decoder Linear weights (0 for fp16)
    kept_params: int  # stored in 16-bit
    quantized_bytes: int
    kept_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.kept_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / (self.quantized_params + self.kept_params)


def weight_memory(cfg: ModelConfig, mode: str, double_quant: bool = True) -> WeightMemory:
    """Bytes of ``cfg``'s weights in ``mode`` ("fp16", "int8" or "nf4")."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {mode!r}; use one of {', '.join(WEIGHT_MODES)}")
    shapes = linear_shapes(cfg)
    linear = cfg.num_layers * sum(o * i for o, i in shapes)
    kept = kept_params(cfg)
    if mode == "fp16":
        return WeightMemory(mode, 0, kept + linear, 0, HALF_BYTES * (kept + linear))
    if mode == "int8":
        q_bytes = cfg.num_layers * sum(int8_bytes(o, i) for o, i in shapes)
    else:
        q_bytes = cfg.num_layers * sum(nf4_bytes(o * i, double_quant) for o, i in shapes)
    return WeightMemory(mode, linear, kept, q_bytes, HALF_BYTES * kept)


def largest_linear(cfg: ModelConfig) -> int:
    """Values in the largest decoder Linear weight (what one dequantization materialises)."""
    return max(o * i for o, i in linear_shapes(cfg))
