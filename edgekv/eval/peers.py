"""Peers on the same text: the same checkpoint run by transformers, with its own caches.

    hf            DynamicCache (no quantization): the harness check; its prefill
                  perplexity must equal EdgeKV's fp16 row
    quanto-int4   QuantizedCache(backend="quanto", nbits=4)   needs optimum-quanto
    quanto-int2   QuantizedCache(backend="quanto", nbits=2)
    hqq-int4      QuantizedCache(backend="hqq", nbits=4)       needs hqq
    hqq-int2      QuantizedCache(backend="hqq", nbits=2)

The quantized caches run with transformers' defaults: asymmetric groups of 64 values
(``q_group_size``, ``axis=0``) with scale and zero point in the model's dtype, and the
newest 128 tokens kept unquantized (``residual_length``; ``EvalConfig.peer_residual``
changes it, 0 quantizes everything as EdgeKV does). They quantize only what an earlier
call cached, so a prefill never sees their error: they are scored token by token.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import torch

from .config import PEERS
from .subjects import Subject

_SPECS = {  # name -> (QuantizedCache backend, bits, the module the backend needs)
    "hf": (None, None, None),
    "quanto-int4": ("quanto", 4, "optimum.quanto"),
    "quanto-int2": ("quanto", 2, "optimum.quanto"),
    "hqq-int4": ("hqq", 4, "hqq"),
    "hqq-int2": ("hqq", 2, "hqq"),
}
assert tuple(_SPECS) == PEERS


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def select_peers(requested: str | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(peers to run, notes on those left out). ``requested``: "auto", "none" or names."""
    if requested == "none":
        return [], []
    names = list(PEERS) if requested == "auto" else list(requested)
    run, notes = [], []
    for n in names:
        module = _SPECS[n][2]
        if module is None or _installed(module):
            run.append(n)
        else:
            pkg = "optimum-quanto" if module.startswith("optimum") else module
            notes.append(f"peer {n}: not measured, {pkg} is not installed")
    return run, notes


def load_hf_model(model_dir: Path, dtype: str, device: str | torch.device):
    """The checkpoint as a transformers model in eval mode, in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    from edgekv.models.loader import resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                 dtype=resolve_dtype(dtype, None))
    return model.to(device).eval()


class HFSubject(Subject):
    """A transformers model with a DynamicCache or a QuantizedCache (``PEERS``)."""

    backend = "transformers"

    def __init__(self, model, name: str, residual_length: int | None = None):
        backend, bits, _ = _SPECS[name]
        self.model, self.name, self._backend, self._bits = model, name, backend, bits
        self._residual = residual_length if backend is not None else None
        self.exact_window = None if backend is None else (
            128 if residual_length is None else residual_length)
        if backend is not None:
            self.note = f"residual_length={128 if residual_length is None else residual_length}"
        self.prefill_reflects_cache = backend is None
        self.device = next(model.parameters()).device
        self._new_cache()  # fail now (ImportError, ValueError) rather than mid-run

    def _new_cache(self):
        from transformers import DynamicCache, QuantizedCache

        if self._backend is None:
            return DynamicCache(config=self.model.config)
        return QuantizedCache(self._backend, self.model.config, nbits=self._bits,
                              residual_length=self._residual)

    @torch.inference_mode()
    def logits(self, ids: list[int], decode: bool) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)  # (1, T)
        if not decode:
            return self.model(x, use_cache=False).logits[0].float().cpu()  # (T, V)
        cache, out = self._new_cache(), []
        for i in range(x.shape[1]):
            o = self.model(x[:, i : i + 1], past_key_values=cache, use_cache=True)
            out.append(o.logits[0, -1].float().cpu())
        return torch.stack(out)  # (T, V)

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        """One prompt at a time: prefill it, then decode ``max_new`` tokens."""
        outs = []
        for p in prompts:
            cache, toks = self._new_cache(), []
            x = torch.tensor([p], device=self.device)  # (1, P)
            for _ in range(max_new):
                logits = self.model(x, past_key_values=cache, use_cache=True).logits[0, -1]
                toks.append(int(logits.argmax()))
                x = torch.tensor([[toks[-1]]], device=self.device)
            outs.append(toks)
        return outs

    def close(self) -> None:  # the model is shared by all peers; the runner frees it
        gc.collect()
