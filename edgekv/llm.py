"""The Python API: ``LLM`` and what ``generate`` returns."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekv.models import load_model
from edgekv.quant import get_format

from .config import CacheConfig, parse_memory
from .engine import Engine
from .memory import auto_kv_budget
from .sampling import SamplingParams
from .sequence import Sequence

log = logging.getLogger("edgekv")

EVICTION_POLICIES: tuple[str, ...] = ()  # filled in by the eviction work
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"  # package data, see its README.md


@dataclass
class RequestOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_token_ids: list[int]


class LLM:
    """A model over a paged, quantized KV cache.

    ``model``: a local HF-format directory or a hub id. ``kv_format``: how K/V are stored
    (``edgekv.quant.FORMATS``). ``kv_memory``: the KV pool's size in bytes or as "512MiB";
    None sizes it from free memory. ``weights``: None, "int8" or "nf4" (bitsandbytes).
    ``dtype``: torch dtype or its name; None keeps the checkpoint's.
    """

    def __init__(self, model: str | Path | None = None, kv_format: str = "int8",
                 kv_memory: int | str | None = None, block_size: int = 16,
                 eviction: str | None = None, weights: str | None = None,
                 device: str | torch.device | None = None, dtype=None, seed: int = 0,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None):
        get_format(kv_format)  # fail fast on a bad name, before loading anything
        if eviction is not None and eviction not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {eviction!r}; valid: None"
                             + "".join(f", {p!r}" for p in EVICTION_POLICIES))
        if model is None:
            model = DEMO_MODEL_DIR
            if not (model / "config.json").is_file():
                raise ValueError(f"the bundled demo model is missing from {model}; pass "
                                 f"model=PATH, or train it: scripts/train_demo_model.py")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.model_config, self.model_dir = load_model(model, self.device, dtype,
                                                                   weights)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.chat_stop = _chat_stop_strings(self.model_dir)
        mc = self.model_config
        fmt_cost = get_format(kv_format).bytes_per_token(mc.num_kv_heads, mc.head_dim)
        if kv_memory is None:
            budget = auto_kv_budget(self.device, fmt_cost * mc.num_layers,
                                    max_num_seqs * mc.max_position)
        else:
            budget = parse_memory(kv_memory)
        self.cache_config = CacheConfig.for_budget(budget, mc.num_layers, mc.num_kv_heads,
                                                   mc.head_dim, block_size, kv_format)
        self.engine = Engine(self.model, mc, self.cache_config, self.tokenizer, self.device,
                             seed=seed, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens
                             or (2048 if self.device.type == "cuda" else 512))

    # ---- prompts -----------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _sequences(self, prompts, params: SamplingParams | None) -> list[Sequence]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        seqs = [self.engine.new_sequence(self.encode(p), params) for p in prompts]
        return seqs

    # ---- generation --------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order."""
        seqs = self._sequences(prompts, params)
        for s in seqs:
            self.engine.add(s)
        while any(not s.finished for s in seqs):
            self.engine.step()
        return [RequestOutput(s.text, s.output_ids, s.finish_reason,
                              s.token_ids[: s.num_prompt]) for s in seqs]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield the completion's text as it is produced (whole characters only)."""
        (seq,) = self._sequences(prompt, params)
        self.engine.add(seq)
        yield from self.engine.drive(seq)

    def chat(self, system: str | None = None):
        """A conversation whose history stays in the KV cache between turns."""
        from .chat import ChatSession

        return ChatSession(self, system)

    def score(self, prompt: str | list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits (T, vocab) for every position of ``prompt``,
        read through the KV cache (``chunk_size=1``: exactly as decode reads it)."""
        ids = self.encode(prompt)
        if not ids or len(ids) > self.model_config.max_position:
            raise ValueError(f"score needs 1..{self.model_config.max_position} tokens, "
                             f"got {len(ids)}")
        return self.engine.score(ids, chunk_size)

    def kv_stats(self) -> dict:
        """What the KV cache costs now: blocks_total, blocks_used, bytes_used,
        bytes_per_token, live_tokens, utilization, preemptions, ..."""
        return self.engine.kv_stats()


def _chat_stop_strings(model_dir: Path) -> tuple[str, ...]:
    """``stop_strings`` of generation_config.json: where a chat turn ends (may be empty)."""
    f = model_dir / "generation_config.json"
    if not f.is_file():
        return ()
    stop = json.loads(f.read_text()).get("stop_strings") or ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _load_tokenizer(model_dir: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
