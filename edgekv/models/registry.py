"""Model families keyed by their HF architecture string."""

from __future__ import annotations

from collections.abc import Callable

MODEL_REGISTRY: dict[str, type] = {}


def register_model(*architectures: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        for arch in architectures:
            assert arch not in MODEL_REGISTRY, f"{arch} registered twice"
            MODEL_REGISTRY[arch] = cls
        return cls

    return wrap


def get_model_class(architecture: str) -> type:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}") from None
