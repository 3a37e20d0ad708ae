"""Which model a plan is for: a config.json, a model directory, a known name or a hub id.

Only the config is read, never weights. Seven models ship with EdgeKV as config.json files
written from their published shapes (``configs/``), so ``edgekv plan`` works offline on
them by short name (``llama-3.2-3b``) or hub id (``meta-llama/Llama-3.2-3B-Instruct``).
A known hub id is read from the local Hugging Face cache when it is there, else from the
shipped file: the shapes are the same, and planning needs no network. Any other hub id is
fetched from the hub (config.json only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekv.models import MODEL_REGISTRY, ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"

# Short name (a file in configs/) -> the hub ids that share its shapes. Instruct variants
# have the base model's shapes; Qwen2.5-7B/1.5B-Instruct publish max_position_embeddings
# 32768 (131072 with YaRN), the base models 131072.
KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                     "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"),
}
# Hub ids whose published context differs from their shipped file's (lower-case id -> tokens)
PUBLISHED_CONTEXT: dict[str, int] = {
    "qwen/qwen2.5-1.5b-instruct": 32768,
    "qwen/qwen2.5-7b-instruct": 32768,
}


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it: its name, where the config came from, its shapes."""

    name: str
    source: str  # a path, "shipped config", "hub", or "HF cache"
    config: ModelConfig
    notes: tuple[str, ...] = ()  # facts the plan should mention (e.g. an unused window)


def known_name(model: str) -> str | None:
    """The short name a model string refers to (case-insensitive), or None."""
    s = model.strip().lower()
    for name, hub_ids in KNOWN_MODELS.items():
        if s == name or s in (h.lower() for h in hub_ids):
            return name
    return None


def config_from_hf_dict(cfg: dict[str, Any], name: str = "config.json") -> ModelConfig:
    """The shapes of an HF config dict, as a ModelConfig. Weights-free and lenient where a
    plan does not care: no architecture needed, any RoPE scaling accepted (it is dropped).

    Raises ValueError naming the missing fields when the config lacks a shape.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg.get("text_config") or cfg)  # multimodal configs nest the decoder's
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_parameters", None)
    arch = (cfg.get("architectures") or [None])[0]
    try:
        if arch in MODEL_REGISTRY:  # the family knows its extras (Qwen2 biases, Qwen3 norms)
            return MODEL_REGISTRY[arch].config_from_hf(cfg)
        return ModelConfig.from_hf(cfg, architecture=arch or "unknown")
    except (TypeError, KeyError) as e:
        raise ValueError(f"{name}: malformed config ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def resolve_model(model: str | Path) -> ModelSpec:
    """Read the config of ``model``: a config.json file, a directory holding one, a known
    short name or hub id (shipped config), or another hub id (fetched)."""
    p = Path(model).expanduser()
    if p.is_file():
        return _spec(p.parent.name if p.name == "config.json" else p.stem, str(p), _read(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"model directory {str(p)!r} has no config.json")
        return _spec(p.name, str(p), _read(p / "config.json"))
    s = str(model)
    name = known_name(s)
    if name is not None:
        cached = _hf_cache_config(s) if "/" in s else None
        if cached is not None:
            return _spec(name, f"HF cache ({s})", _read(cached))
        raw = _read(CONFIG_DIR / f"{name}.json")
        if s.strip().lower() in PUBLISHED_CONTEXT:
            raw["max_position_embeddings"] = PUBLISHED_CONTEXT[s.strip().lower()]
        return _spec(name, "shipped config", raw)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return _spec(s, "hub", _read(_hub_config(s)))
    raise ValueError(f"model {s!r} is not a config.json, a model directory, a hub id like "
                     f"'org/name' or a known model ({', '.join(KNOWN_MODELS)})")


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _spec(name: str, source: str, raw: dict) -> ModelSpec:
    config = config_from_hf_dict(raw, f"{name} ({source})")
    notes = []
    window = raw.get("sliding_window") if isinstance(raw, dict) else None
    if window and raw.get("use_sliding_window", True) and window < config.max_position:
        notes.append(f"the config's {window}-token sliding window is not applied by EdgeKV: "
                     f"KV is planned for every token of the context")
    return ModelSpec(name, source, config, tuple(notes))


def _hf_cache_config(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(hub_id, "config.json")
    return Path(hit) if isinstance(hit, str) else None


def _hub_config(hub_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hub_id, "config.json"))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ValueError(f"model {hub_id!r} is not a known model ({', '.join(KNOWN_MODELS)}) "
                         f"and its config.json could not be fetched from the hub "
                         f"({type(e).__name__}); pass a local config.json instead") from None
