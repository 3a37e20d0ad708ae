"""ModelConfig: the architecture facts EdgeKV needs, read once from an HF config.json."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("edgekv")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF architecture string, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # stored KV heads (GQA: num_heads is a multiple)
    head_dim: int
    max_position: int  # longest context the model was built for
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", ...} or {}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds a bias to q, k and v projections
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE
    torch_dtype: str | None = None  # the checkpoint's dtype name
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"config field {f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported RoPE scaling {rope_type!r} (supported: default, "
                             f"llama3, linear)")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], architecture: str | None = None, **overrides
                ) -> ModelConfig:
        """Build from a config.json dict (transformers 4.x ``rope_theta``/``rope_scaling`` or
        5.x ``rope_parameters``). ``overrides`` set family-specific fields."""
        arch = architecture or (cfg.get("architectures") or [None])[0]
        if arch is None:
            raise ValueError("config.json names no architecture ('architectures' is missing)")
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"]
        missing = [k for k in need if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        if not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"config field num_attention_heads must be a positive integer, "
                             f"got {heads!r}")
        if "max_position_embeddings" not in cfg:
            log.warning("config.json has no max_position_embeddings: assuming a context of "
                        "2,048 tokens")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        if "type" in rope and "rope_type" not in rope:  # older configs
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default":
            rope = {}
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        fields = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position=cfg.get("max_position_embeddings", 2048),
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )
        fields.update(overrides)
        return cls(**fields)
