"""The load-time probe: what storing one layer in one format costs the model.

One prefill of a calibration text over a cache whose layers are all ``REFERENCE`` gives
the reference logits, each attention layer's output and the hidden states entering each
layer. Then, for each layer ``l`` and candidate format ``f``, the prefill runs again
over a cache whose layer ``l`` alone is ``f``, starting at layer ``l`` from the hidden
states that entered it (the layers below are the reference's: the model's
``forward_from`` skips them, which halves the probe):

    kl[l][f]  = mean over the later half of the positions of KL(reference || this run)
    err[l][f] = || attn_l(f) - attn_l(reference) || / || attn_l(reference) ||

``err`` is ``f``'s error at layer ``l`` alone. The KL is taken where tokens have context
(the later half), which halves the output head's share of the cost (a 152K vocabulary
is a third of a 0.5B model's prefill). A prefill reads its own tokens back from the
cache (PagedAttention writes, then attends over the stored form), as decode does, so
``kl`` is what decoding with that layer in ``f`` costs.

The prediction a choice is made on: a small error in a layer's attention output costs KL
in proportion to its square (KL is locally quadratic). For each (l, f) a sensitivity c is
fitted over the layer's formats whose error is within 2x of f's (least squares through
the origin) and ``predicted[l][f] = c * err[l][f]^2``. The KL of a few hundred tokens is
noisy where two 4-bit formats differ by a few per cent; the error of every output
element is not. Formats far apart in error are not fitted together: on a model with
outlier keys, a layer's KL per err^2 differs 6x between int8 and int4. The predicted KL
of an assignment is the sum over its layers (assign.py): small, independent errors add.

The reference prefill also records how each layer's error is spread over the ages of the
tokens it reads (age.py): what a format costs on a band of ages only (age tiers,
quality.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgekv.config import CacheConfig
from edgekv.models.attention import AttentionMetadata, PagedAttention

from .age import AgeRecorder, LayerAges

REFERENCE = "fp16"  # what quality is measured against (as edgekv eval's baseline)


@dataclass(frozen=True)
class ProbeResult:
    """kl[l][f] (None where not measured), err[l][f] for every layer l and candidate format
    f (``formats`` order); ``tokens``: the calibration tokens measured."""

    formats: tuple[str, ...]
    kl: tuple[tuple[float | None, ...], ...]  # (num_layers, num_formats) nats per token
    err: tuple[tuple[float, ...], ...]  # (num_layers, num_formats) relative error
    tokens: int
    age: tuple[LayerAges, ...] | None = None  # each layer's error shares by age (age.py)

    @property
    def predicted(self) -> tuple[tuple[float, ...], ...]:
        """(num_layers, num_formats) c_l * err^2 (module docstring)."""
        rows = []
        for kl, err in zip(self.kl, self.err, strict=True):
            row = []
            for e in err:
                known = [(k, x) for k, x in zip(kl, err, strict=True) if k is not None and x]
                near = [(k, x) for k, x in known if e / 2 <= x <= 2 * e] or known
                den = sum(x**4 for _, x in near)
                row.append(sum(k * x * x for k, x in near) / den * e * e if den else 0.0)
            rows.append(tuple(row))
        return tuple(rows)

    def to_json(self) -> dict:
        return {"formats": list(self.formats), "kl": [list(r) for r in self.kl],
                "err": [list(r) for r in self.err], "tokens": self.tokens,
                "age": None if self.age is None else [a.to_json() for a in self.age]}

    @classmethod
    def from_json(cls, d: dict) -> ProbeResult:
        fmts = tuple(str(f) for f in d["formats"])
        kl = tuple(tuple(None if x is None else float(x) for x in row) for row in d["kl"])
        err = tuple(tuple(float(x) for x in row) for row in d["err"])
        if not kl or any(len(r) != len(fmts) for r in kl + err) or len(kl) != len(err):
            raise ValueError("malformed probe result")
        age = d.get("age")
        if age is not None:
            age = tuple(LayerAges.from_json(a) for a in age)
            if len(age) != len(kl):
                raise ValueError("malformed probe result")
        return cls(fmts, kl, err, int(d["tokens"]), age)


def _cache_meta(num_layers: int, num_kv_heads: int, head_dim: int, T: int,
                formats: Sequence[str], block_size: int, dev) -> AttentionMetadata:
    """One sequence of T tokens prefilled over a fresh cache of per-layer ``formats``."""
    from edgekv.cache.kv_cache import PagedKVCache

    nb = -(-T // block_size)
    cfg = CacheConfig(num_layers, num_kv_heads, head_dim, nb, block_size, ",".join(formats))
    return AttentionMetadata(
        slot_mapping=torch.arange(T, device=dev),
        block_tables=torch.arange(nb, dtype=torch.int32, device=dev).view(1, nb),
        seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
        cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=dev),
        max_query_len=T, max_seq_len=T, kv_cache=PagedKVCache(cfg, dev))


class _Runner:
    """Prefills of the calibration ids over per-layer formats, whole or from one layer."""

    def __init__(self, model, num_layers, num_kv_heads, head_dim, ids, block_size, progress):
        self.model, self.ids, self.block_size = model, ids, block_size
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.progress, self.done, self.total = progress, 0, 1
        self.scored = max(1, ids.shape[0] // 2)  # positions whose logits are compared
        self.decoder = getattr(model, "model", None)
        self.entering: list[torch.Tensor] = []  # hidden states entering each layer
        self.resumable = hasattr(self.decoder, "forward_from")

    @torch.inference_mode()
    def __call__(self, formats, first: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (scored, V) fp32 of the later positions, attention outputs (T, hidden)
        fp32 of the layers run). ``first`` > 0 (resumable models) starts at that layer
        from the reference's hidden states. The first call records ``entering``."""
        T, dev = self.ids.shape[0], self.ids.device
        meta = _cache_meta(*self.shape, T, formats, self.block_size, dev)
        outs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(o.float()))
                 for m in self.model.modules() if isinstance(m, PagedAttention)]
        if not self.entering and self.decoder is not None:
            hooks += [layer.register_forward_pre_hook(lambda m, a: self.entering.append(a[0]))
                      for layer in self.decoder.layers]
        positions = torch.arange(T, device=dev)
        try:
            if self.resumable and first and self.entering:
                hidden = self.decoder.forward_from(first, self.entering[first], positions,
                                                   meta)
            else:
                hidden = self.model(self.ids, positions, meta)
        finally:
            for h in hooks:
                h.remove()
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))
        return self.model.compute_logits(hidden[-self.scored:]).float(), outs


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logp = F.log_softmax(logits.double(), dim=-1)
    d = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).mean().item()
    return d if math.isfinite(d) else float("inf")


def measure(model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
            ids: list[int], formats: Sequence[str], block_size: int = 16,
            device: torch.device | str = "cpu",
            progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Measure err and kl of every layer and format (module docstring) on ``ids``.
    ``progress(done, total)`` is called after each prefill."""
    run = _Runner(model, num_layers, num_kv_heads, head_dim,
                  torch.tensor(ids, dtype=torch.long, device=device), block_size, progress)
    others = [j for j, f in enumerate(formats) if f != REFERENCE]
    run.total = 1 + num_layers * len(others)
    ages = AgeRecorder()
    hooks = [m.register_forward_hook(lambda mod, a, o: ages.add(mod.layer_idx,
                                                                *mod._qkv(*a)[:2], mod.scale))
             for m in model.modules() if isinstance(m, PagedAttention)]
    try:
        ref_logits, ref_outs = run([REFERENCE] * num_layers)
    finally:
        for h in hooks:
            h.remove()
    run.resumable = run.resumable and len(run.entering) == num_layers
    ref_logp = F.log_softmax(ref_logits.double(), dim=-1)  # (T / 2, V): the later half
    kl: list[list[float | None]] = []
    err: list[list[float]] = []
    for layer in range(num_layers):
        kl_row: list[float | None] = [None] * len(formats)
        err_row = [0.0] * len(formats)
        for j, f in enumerate(formats):
            if f == REFERENCE:
                kl_row[j] = 0.0
                continue
            names = [REFERENCE] * num_layers
            names[layer] = f
            logits, outs = run(names, layer)
            o = outs[0] if run.resumable else outs[layer]
            r = ref_outs[layer]
            err_row[j] = ((o - r).norm() / r.norm().clamp(min=1e-30)).item()
            kl_row[j] = _kl(ref_logp, logits)
        kl.append(kl_row)
        err.append(err_row)
    return ProbeResult(tuple(formats), tuple(tuple(r) for r in kl),
                       tuple(tuple(r) for r in err), len(ids), ages.result(num_layers))
