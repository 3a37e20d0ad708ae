"""Load a checkpoint: a local HF-format directory or a hub id -> (model, config, tokenizer).

The directory holds config.json, one or many ``*.safetensors`` shards and, optionally,
tokenizer files. The model is built on the meta device (no memory), materialised on the
target device in the target dtype, then filled shard by shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import llama, mistral, qwen2, qwen3  # noqa: F401  (register the families)
from .config import ModelConfig
from .layers import RotaryEmbedding, rope_inv_freq
from .registry import get_model_class

log = logging.getLogger("edgekv")

WEIGHT_MODES = (None, "int8", "nf4")


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory, or a hub id fetched (or found in the cache) by huggingface_hub."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"model directory {str(p)!r} has no config.json")
        return p
    s = str(model)
    looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~"))
    if p.exists() or not looks_like_hub_id:
        raise ValueError(f"model {s!r} is not a model directory (with config.json) "
                         f"or a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                 "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ValueError(f"model {s!r} is not a local directory and could not be fetched "
                         f"from the hub ({type(e).__name__}); without network, download it "
                         f"elsewhere and pass its local path") from None
    return Path(d)


def read_config(model_dir: Path) -> tuple[type, ModelConfig]:
    f = model_dir / "config.json"
    try:
        hf = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"cannot read {f}: {_reason(e)}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{f} is not a JSON object")
    arch = (hf.get("architectures") or [None])[0]
    if arch is None:
        raise ValueError(f"{model_dir}/config.json names no architecture")
    cls = get_model_class(arch)
    try:
        cfg = cls.config_from_hf(hf)
    except (KeyError, TypeError) as e:  # a field missing or of the wrong type
        raise ValueError(f"{f} does not describe a {arch}: {type(e).__name__} {e}") from None
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < cfg.max_position:
        log.warning("%s: sliding-window attention (%d tokens) is not applied; contexts "
                    "longer than the window attend to all tokens", arch, window)
    return cls, cfg


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    name = dtype if dtype is not None else (cfg.torch_dtype or "float32")
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16}
    if name not in aliases:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(aliases)}")
    return aliases[name]


def load_model(model: str | Path, device: torch.device, dtype=None, weights: str | None = None
               ) -> tuple[nn.Module, ModelConfig, Path]:
    """Build and load a model. Returns (model in eval mode, its config, its directory)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; use None, 'int8' or 'nf4'")
    model_dir = resolve_model_dir(model)
    cls, cfg = read_config(model_dir)
    dtype = resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        net = cls(cfg)
    net = net.to(dtype).to_empty(device=device)
    net.tie_weights()
    _load_weights(net, model_dir, cfg)
    for m in net.modules():  # non-persistent buffers were left uninitialised by to_empty
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(cfg).to(device)
    if weights:
        _quantize_linears(net, weights, dtype, device)
    return net.eval(), cfg, model_dir


def _load_weights(net: nn.Module, model_dir: Path, cfg: ModelConfig) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for f in files:
            for name, t in _tensors(f, params):
                if t.shape != params[name].shape:
                    raise ValueError(f"{f.name}: {name} has shape {tuple(t.shape)}, the "
                                     f"config implies {tuple(params[name].shape)}")
                params[name].copy_(t)
                loaded.add(name)
    missing = set(params) - loaded
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {', '.join(sorted(missing)[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _tensors(f: Path, wanted):
    """(name, tensor) for the tensors of the safetensors file ``f`` whose names are in
    ``wanted``; a damaged or truncated file is a ValueError that names it."""
    try:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in wanted:  # others: e.g. rotary inv_freq saved by old checkpoints
                    yield name, st.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read the weights in {f}: {_reason(e)} (a damaged or "
                         f"partly downloaded file?)") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _quantize_linears(net: nn.Module, mode: str, dtype: torch.dtype, device) -> None:
    """Swap the decoder's nn.Linear layers for bitsandbytes int8 / nf4 ones (lm_head kept)."""
    import bitsandbytes as bnb

    for layer in net.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                w = lin.weight.data.to("cpu", torch.float16 if dtype == torch.float32 else dtype)
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features,
                                            bias=lin.bias is not None, has_fp16_weights=False,
                                            threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features,
                                          bias=lin.bias is not None, compute_dtype=dtype,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
                q = q.to(device)
                if mode == "nf4" and not q.weight.bnb_quantized:
                    q.weight = q.weight._quantize(device)
                setattr(parent, name, q)
