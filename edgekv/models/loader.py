"""Load a checkpoint: a local HF-format directory or a hub id -> (model, config, tokenizer).

The directory holds config.json, one or many ``*.safetensors`` shards and, optionally,
tokenizer files. The model is built on the target device in the target dtype with its
parameters left uninitialised (no memory is touched), then filled tensor by tensor from the shards
(``safetensors_reader``), so that loading peaks near the weights' own bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from . import llama, mistral, qwen2, qwen3  # noqa: F401  (register the families)
from .config import ModelConfig
from .registry import get_model_class
from .safetensors_reader import load_into

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


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig | None,
                  device: torch.device | str | None = None) -> torch.dtype:
    """The dtype weights and activations compute in: ``dtype`` when given (a torch dtype or
    its name), else the checkpoint's, moved on a CPU to one the CPU computes fast
    (``cpu_compute_dtype``)."""
    if dtype is None:
        ckpt = _dtype_from_name((cfg.torch_dtype if cfg else None) or "float32")
        if device is not None and torch.device(device).type == "cpu":
            return cpu_compute_dtype(ckpt)
        return ckpt
    return dtype if isinstance(dtype, torch.dtype) else _dtype_from_name(dtype)


def _dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def cpu_compute_dtype(checkpoint: torch.dtype) -> torch.dtype:
    """On a CPU, fp16 checkpoints compute in fp32: x86 CPUs have no fast fp16 arithmetic
    for the elementwise ops (norms, RoPE, softmax), and fp16 -> fp32 is exact. bf16
    checkpoints stay bf16 where the CPU multiplies bf16 natively (AVX512-BF16 / AMX, as
    oneDNN reports it), else fp32. fp16 -> bf16 is never chosen: it would drop 3 mantissa
    bits of every weight (and, measured on the demo model with one thread, bf16 decodes 20%
    slower than fp32 at batch 1, 11% faster at batch 16). ``dtype="bfloat16"`` opts in."""
    if checkpoint == torch.float16:
        return torch.float32
    if checkpoint == torch.bfloat16 and not _native_bf16():
        return torch.float32
    return checkpoint


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_model(model: str | Path, device: torch.device, dtype=None, weights: str | None = None
               ) -> tuple[nn.Module, ModelConfig, Path]:
    """Build and load a model. Returns (model in eval mode, its config, its directory)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; use None, 'int8' or 'nf4'")
    model_dir = resolve_model_dir(model)
    cls, cfg = read_config(model_dir)
    dtype = resolve_dtype(dtype, cfg, device)
    # Built in place: parameters are allocated uninitialised in the target dtype (their pages
    # are untouched until the checkpoint's bytes land in them), so loading holds the weights
    # once. Not on the meta device: there, torch's first decomposition costs 3 s and 150 MB.
    with torch.device(device), _default_dtype(dtype), _skip_init():
        net = cls(cfg)
    net.tie_weights()
    _load_weights(net, model_dir, cfg)
    if weights:
        _quantize_linears(net, weights, dtype, device)
    return net.eval(), cfg, model_dir


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Floating-point tensors created inside are ``dtype`` (parameters born in the target
    dtype: no conversion copy)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@contextlib.contextmanager
def _skip_init():
    """No random initialisation while the model is built: every parameter is overwritten by
    the checkpoint, and initialising would touch (make resident) all of its memory."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "trunc_normal_", "ones_", "zeros_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _load_weights(net: nn.Module, model_dir: Path, cfg: ModelConfig) -> None:
    """Fill the parameters from the shards, one tensor at a time (``read_weights``)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    for f in files:
        loaded |= read_weights(f, params)
    missing = set(params) - loaded
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {', '.join(sorted(missing)[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")


def read_weights(path: Path, params: dict[str, torch.Tensor]) -> set[str]:
    """The one place checkpoint files are read: fills ``params`` from the safetensors file
    ``path`` without holding the file and the parameters at once; names absent from
    ``params`` (e.g. rotary inv_freq saved by old checkpoints) are skipped. Returns the
    names filled; a broken or truncated file is one ValueError."""
    return load_into(path, params)


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
