"""The load-time probe: what storing one layer in one format costs the model.

One prefill of a calibration text over a cache whose layers are all ``REFERENCE`` gives
the reference logits and each attention layer's output. Then, for each layer ``l`` and
each candidate format ``f``, the same prefill over a cache whose layer ``l`` alone is
``f`` gives

    kl[l][f]  = mean over positions of KL(reference || this run)          (nats/token)
    err[l][f] = || attn_l(this run) - attn_l(reference) || / || attn_l(reference) ||

Layers below ``l`` are exact in both runs, so layer ``l`` sees the reference's input and
``err`` is its format's error alone; and the run starts at layer ``l`` from the hidden
states the reference run recorded entering it (the model's ``forward_from``), which
halves the probe's cost: layers x formats prefills of L - l layers each. A prefill reads
its own tokens back from the cache (PagedAttention writes, then attends over the stored
form), as decode does, so ``kl`` is what decoding with that layer in ``f`` costs.

The prediction a choice is made on smooths ``kl`` with ``err``: a small error in a layer's
attention output costs KL in proportion to its square (KL is locally quadratic). For each
(l, f) a sensitivity is fitted over the layer's formats whose error is within 2x of f's
(least squares through the origin) and ``predicted[l][f] = c * err[l][f]^2``. The KL of a
few hundred tokens is noisy where two formats differ by a few per cent (int4_nl against
int4_g32); the error of every output element is not. Formats far apart in error (int8
against int4) are not fitted together: on a model with outlier keys, a layer's KL per
err^2 differs 6x between them. The predicted KL of an assignment is the sum over its
layers (assign.py): small, independent errors add.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgekv.config import CacheConfig
from edgekv.models.attention import AttentionMetadata, PagedAttention

REFERENCE = "fp16"  # what quality is measured against (as edgekv eval's baseline)


@dataclass(frozen=True)
class ProbeResult:
    """kl[l][f], err[l][f] for every layer l and candidate format f (``formats`` order);
    ``tokens``: the calibration tokens measured."""

    formats: tuple[str, ...]
    kl: tuple[tuple[float, ...], ...]  # (num_layers, num_formats) nats per token
    err: tuple[tuple[float, ...], ...]  # (num_layers, num_formats) relative error
    tokens: int

    @property
    def predicted(self) -> tuple[tuple[float, ...], ...]:
        """(num_layers, num_formats) c_l * err^2 (module docstring)."""
        rows = []
        for kl, err in zip(self.kl, self.err, strict=True):
            row = []
            for e in err:
                near = [(k, x) for k, x in zip(kl, err, strict=True) if e / 2 <= x <= 2 * e]
                den = sum(x**4 for _, x in near)
                row.append(sum(k * x * x for k, x in near) / den * e * e if den else 0.0)
            rows.append(tuple(row))
        return tuple(rows)

    def to_json(self) -> dict:
        return {"formats": list(self.formats), "kl": [list(r) for r in self.kl],
                "err": [list(r) for r in self.err], "tokens": self.tokens}

    @classmethod
    def from_json(cls, d: dict) -> ProbeResult:
        fmts = tuple(str(f) for f in d["formats"])
        kl = tuple(tuple(float(x) for x in row) for row in d["kl"])
        err = tuple(tuple(float(x) for x in row) for row in d["err"])
        if not kl or any(len(r) != len(fmts) for r in kl + err) or len(kl) != len(err):
            raise ValueError("malformed probe result")
        return cls(fmts, kl, err, int(d["tokens"]))


@torch.inference_mode()
def _prefill(model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
             ids: torch.Tensor, formats: Sequence[str], block_size: int, first: int = 0,
             entering: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (T, V) fp32 of one prefill of ``ids`` (T,) over a fresh cache of per-layer
    ``formats``, and each attention layer's output (T, hidden) fp32 from layer ``first``
    on. ``first`` > 0 starts there from ``entering[first]`` (the hidden states entering
    that layer in a run whose earlier layers are the same); with ``first`` == 0 and a list
    ``entering``, it is filled with the hidden states entering every layer."""
    from edgekv.kv_cache import PagedKVCache

    T, dev = ids.shape[0], ids.device
    nb = -(-T // block_size)
    cfg = CacheConfig(num_layers, num_kv_heads, head_dim, nb, block_size, ",".join(formats))
    cache = PagedKVCache(cfg, dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(T, device=dev),
        block_tables=torch.arange(nb, dtype=torch.int32, device=dev).view(1, nb),
        seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
        cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=dev),
        max_query_len=T, max_seq_len=T, kv_cache=cache)
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(o.float()))
             for m in model.modules() if isinstance(m, PagedAttention)]
    decoder = getattr(model, "model", None)
    if first == 0 and entering == [] and decoder is not None:  # the reference run
        hooks += [layer.register_forward_pre_hook(lambda mod, a: entering.append(a[0]))
                  for layer in decoder.layers]
    positions = torch.arange(T, device=dev)
    try:
        if first:
            hidden = decoder.forward_from(first, entering[first], positions, meta)
        else:
            hidden = model(ids, positions, meta)
    finally:
        for h in hooks:
            h.remove()
    return model.compute_logits(hidden).float(), outs


def measure(model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
            ids: list[int], formats: Sequence[str], block_size: int = 16,
            device: torch.device | str = "cpu",
            progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Measure kl and err (module docstring) of every (layer, format) on ``ids``.

    ``progress(done, total)`` is called after each prefill (1 + layers x formats)."""
    t = torch.tensor(ids, dtype=torch.long, device=device)
    total, done = 1 + num_layers * sum(f != REFERENCE for f in formats), 0

    entering: list[torch.Tensor] = []  # hidden states entering each layer, reference run
    resumable = hasattr(getattr(model, "model", None), "forward_from")

    def run(names, first=0):
        nonlocal done
        out = _prefill(model, num_layers, num_kv_heads, head_dim, t, names, block_size,
                       first if resumable else 0, entering)
        done += 1
        if progress is not None:
            progress(done, total)
        return out

    ref_logits, ref_outs = run([REFERENCE] * num_layers)
    resumable = resumable and len(entering) == num_layers
    ref_logp = F.log_softmax(ref_logits.double(), dim=-1)  # (T, V)
    kl, err = [], []
    for layer in range(num_layers):
        kl_row, err_row = [], []
        for f in formats:
            if f == REFERENCE:
                kl_row.append(0.0)
                err_row.append(0.0)
                continue
            names = [REFERENCE] * num_layers
            names[layer] = f
            logits, outs = run(names, layer)  # layers below are the reference's: skipped
            logp = F.log_softmax(logits.double(), dim=-1)
            d = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).mean().item()
            r = ref_outs[layer]
            o = outs[0] if resumable else outs[layer]
            e = ((o - r).norm() / r.norm().clamp(min=1e-30)).item()
            kl_row.append(d if math.isfinite(d) else float("inf"))
            err_row.append(e)
        kl.append(tuple(kl_row))
        err.append(tuple(err_row))
    return ProbeResult(tuple(formats), tuple(kl), tuple(err), len(ids))
