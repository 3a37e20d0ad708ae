"""A CPU decode step's decoder layers without their modules.

At batch 1 the torch path spends more time around a layer's four matmuls than in them
(kernels/cpu_jit_layer.py says why); for one sequence a layer's norms, projections,
attention and MLP run as one compiled call over the weights' own memory. For several
sequences a layer is eight calls: norm, qkv matmul, the compiled attention layer, the
output projection added into the residual stream in one ``addmm_``, norm, gate/up matmul,
SiLU-and-multiply, the down projection added the same way (the modules' path is ~30 calls
and a module dispatch each). The matmuls: torch's GEMM where the weights lie transposed (a
small model: layers.transpose_for_cpu); else, up to 16 sequences, the compiled
small_linear, which streams large weights faster (kernels/cpu_jit_layer.py).

``run`` is called by the decoder for a decode step that the runner planned for the
compiled kernels; it returns how many layers it ran (the modules run the rest: all of
them where a layer cannot be fused, e.g. Qwen3's q/k norms, bitsandbytes layers, non-fp32
weights).

The per-layer weight views are made once and kept on the model, checked against the
parameters' storage every step (a checkpoint copied in, or a moved model, rebuilds them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgekv.kernels import cpu_jit
from edgekv.kernels.cpu_compiled import _views, compiled_layer, layer_kind
from edgekv.kernels.cpu_compiled import enabled as cpu_compiled_on

from .layers import RMSNorm, SwiGLU, fused_linear

_EMPTY = np.zeros(0, np.float32)


def _np(t: torch.Tensor | None, transposed: bool) -> np.ndarray:
    """A vector, or a weight as it lies in memory: (out, in), or (in, out) where
    ``transposed`` (layers.transpose_for_cpu)."""
    if t is None:
        return _EMPTY
    return (t.t() if transposed and t.dim() == 2 else t).detach().numpy()


def fusable(layer: nn.Module) -> bool:
    """Whether a decoder layer's attention can take the compiled decode layer at all (no
    q/k norms, q, k and v projections that fuse)."""
    attn = layer.self_attn
    return not hasattr(attn, "q_norm") and fused_linear(attn, ("q_proj", "k_proj",
                                                               "v_proj")) is not None


def _layer_weights(layer: nn.Module) -> tuple[tuple, bool] | None:
    """((ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd) fp32 tensors, biases may be None;
    whether the matrices lie transposed), or None."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "q_norm") or type(mlp) is not SwiGLU or not all(
            type(n) is RMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
        return None
    qkv = fused_linear(attn, ("q_proj", "k_proj", "v_proj"))
    gu = fused_linear(mlp, ("gate_proj", "up_proj"))
    if qkv is None or gu is None or type(attn.o_proj) is not nn.Linear \
            or type(mlp.down_proj) is not nn.Linear:
        return None
    ts = (layer.input_layernorm.weight, qkv[0], qkv[1], attn.o_proj.weight, attn.o_proj.bias,
          layer.post_attention_layernorm.weight, gu[0], gu[1], mlp.down_proj.weight,
          mlp.down_proj.bias)
    mats = (qkv[0], attn.o_proj.weight, gu[0], mlp.down_proj.weight)
    transposed = all(t.t().is_contiguous() for t in mats)
    if not transposed and not all(t.is_contiguous() for t in mats):
        return None
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or (
            t.dim() == 1 and not t.is_contiguous())) for t in ts):
        return None
    return tuple(None if t is None else t.detach() for t in ts), transposed


def _weights(model: nn.Module) -> list[tuple[tuple, tuple, bool]] | None:
    """Per layer (the weights as tensors, as numpy, whether the matrices lie transposed),
    or None where a layer cannot fuse."""
    key = _key(model)
    cached = model.__dict__.get("_cpu_fused")
    if cached is None or cached[0] != key:
        ws = [_layer_weights(layer) for layer in model.layers]
        ws = None if any(w is None for w in ws) else [
            (w, tuple(_np(t, tr) for t in w), tr) for w, tr in ws]
        cached = (_key(model), ws)  # after fusing
        model.__dict__["_cpu_fused"] = cached
    return cached[1]


def _key(model: nn.Module) -> tuple[int, ...]:
    """The layers' parameters' storage: a checkpoint copied in, a moved model or a replaced
    parameter changes it (read from each module's own table, without walking the tree)."""
    return tuple(p.data_ptr() for m in _modules(model) for p in m._parameters.values()
                 if p is not None)


def _modules(model: nn.Module) -> list[nn.Module]:
    mods = model.__dict__.get("_cpu_fused_modules")
    if mods is None:
        mods = model.__dict__["_cpu_fused_modules"] = list(model.layers.modules())
    return mods


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook would see the layers' modules run (a fused call skips them)."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    return any(x._forward_hooks or x._forward_pre_hooks for x in _modules(model))


def run(model: nn.Module, x: torch.Tensor, meta) -> int:
    """x (S, hidden) fp32, the embedded new tokens of a decode step (one per sequence),
    updated in place layer by layer; ``meta`` the step's AttentionMetadata (its plan has
    ``jit``). Returns the layers run (0 where a layer cannot be fused, or a forward hook is
    registered: the modules run then)."""
    if x.dtype != torch.float32 or x.requires_grad or _hooked(model):
        return 0
    ws = _weights(model)
    if ws is None:
        return 0
    if x.shape[0] == 1:
        return _one(model, x, meta, ws)
    return _rows(model, x, meta, ws)


def _one(model: nn.Module, x: torch.Tensor, meta, ws: list[tuple]) -> int:
    """One sequence: each layer one compiled call (cpu_jit_layer.layer)."""
    step = meta.plan.jit
    cache = meta.kv_cache
    attn = model.layers[0].self_attn
    cos, sin = (t.float().view(1, -1).numpy() for t in meta.rope)
    xv = x.view(-1).numpy()
    eps = model.layers[0].input_layernorm.eps
    threads = torch.get_num_threads()
    for i, (_, w, transposed) in enumerate(ws):
        k, v = cache.layers[i]
        lk = layer_kind(cache.formats[i], attn.head_dim)
        if not cpu_jit.decoder_layer(xv, w, transposed, eps, cos, sin, lk.rot, step.blocks,
                                     step.offsets,
                                     (*_views(k), *_views(v)), step.tables, step.lens,
                                     step.max_len, attn.scale, lk.kind, lk.offset, lk.qmax,
                                     lk.symmetric, threads, lk.table):
            return i
    return len(ws)


def _rows(model: nn.Module, x: torch.Tensor, meta, ws: list[tuple]) -> int:
    """Several sequences (x (S, hidden)): eight calls a layer, no module."""
    step = meta.plan.jit
    cache = meta.kv_cache
    head_dim = model.layers[0].self_attn.head_dim
    cos, sin = (t.float() for t in meta.rope)  # (S, 1, D) each
    rows = x.shape[0] <= SMALL_ROWS
    for i, (layer, (w, wn, transposed)) in enumerate(zip(model.layers, ws, strict=True)):
        mm = _torch_mm if transposed or not rows else _small_mm
        h = _norm(x, w[0], wn[0], layer.input_layernorm.eps)
        qkv = mm(h, w[1], w[2], wn[1], wn[2])  # (S, (Hq + 2 Hkv) * D)
        k, v = cache.layers[i]
        lk = layer_kind(cache.formats[i], head_dim)
        o = compiled_layer(qkv, cos, sin, k, v, step, lk, layer.self_attn.scale)  # (S, Hq D)
        if o is None:  # the kernel failed to compile: nothing written, the modules go on
            return i
        mm(o, w[3], w[4], wn[3], wn[4], out=x)
        gu = mm(_norm(x, w[5], wn[5], layer.post_attention_layernorm.eps), w[6], w[7], wn[6],
                wn[7])
        n = gu.shape[1] // 2  # gu (S, 2 I): gate, up
        mm(nn.functional.silu(gu[:, :n]).mul_(gu[:, n:]), w[8], w[9], wn[8], wn[9], out=x)
    return len(ws)


# Rows up to which a model whose weights stay (out, in) takes small_linear, not torch.
SMALL_ROWS = 16


def _torch_mm(a, w, b, wn, bn, out=None):
    """a @ w^T + b, or ``out`` += that in place (one addmm_)."""
    if out is None:
        return nn.functional.linear(a, w, b)
    out.addmm_(a, w.t())
    if b is not None:
        out.add_(b)
    return out


def _small_mm(a, w, b, wn, bn, out=None):
    """As ``_torch_mm``, through the compiled small_linear over (out, in) rows."""
    y = cpu_jit.small_linear(a.numpy(), wn, bn, torch.get_num_threads()) \
        if cpu_compiled_on() else None
    if y is None:
        return _torch_mm(a, w, b, wn, bn, out)
    y = torch.from_numpy(y)
    return y if out is None else out.add_(y)


def _norm(x: torch.Tensor, w: torch.Tensor, wn: np.ndarray, eps: float) -> torch.Tensor:
    """RMSNorm of the rows x (S, H) with weight w (wn: its numpy view), compiled."""
    out = cpu_jit.rms_norm(x.numpy(), wn, eps) if cpu_compiled_on() else None
    return nn.functional.rms_norm(x, w.shape, w, eps) if out is None else \
        torch.from_numpy(out)


