"""A CPU decode step's decoder layers without their modules.

At batch 1 the torch path spends more time around a layer's four matmuls than in them
(kernels/cpu_jit_layer.py says why); for one sequence a layer's norms, projections,
attention and MLP run as one compiled call over the weights' own memory. For several
sequences torch's GEMM takes the projections (the weights stored transposed, which it
reads without repacking: layers.cpu_layout), and a layer is eight calls: norm, qkv
matmul, the compiled attention layer, the output projection added into the residual
stream in one ``addmm_``, norm, gate/up matmul, SiLU-and-multiply, the down projection
added the same way (the modules' path is ~30 calls and a module dispatch each).

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

from .layers import RMSNorm, SwiGLU, cpu_layout, fused_linear, in_cpu_layout, linear

_EMPTY = np.zeros(0, np.float32)


def _np(t: torch.Tensor | None) -> np.ndarray:
    """A vector, or a weight (out, in) as its (in, out) memory (``layers.cpu_layout``)."""
    if t is None:
        return _EMPTY
    return (t.t() if t.dim() == 2 else t).detach().numpy()


def fusable(layer: nn.Module) -> bool:
    """Whether a decoder layer's attention can take the compiled decode layer at all (no
    q/k norms, q, k and v projections that fuse)."""
    attn = layer.self_attn
    return not hasattr(attn, "q_norm") and fused_linear(attn, ("q_proj", "k_proj",
                                                               "v_proj")) is not None


def _layer_weights(layer: nn.Module) -> tuple | None:
    """(ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd) fp32 tensors (biases may be None),
    or None."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "q_norm") or type(mlp) is not SwiGLU or not all(
            type(n) is RMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
        return None
    qkv = fused_linear(attn, ("q_proj", "k_proj", "v_proj"))
    gu = fused_linear(mlp, ("gate_proj", "up_proj"))
    if qkv is None or gu is None or type(attn.o_proj) is not nn.Linear \
            or type(mlp.down_proj) is not nn.Linear:
        return None
    cpu_layout(attn.o_proj.weight)
    cpu_layout(mlp.down_proj.weight)
    ts = (layer.input_layernorm.weight, qkv[0], qkv[1], attn.o_proj.weight, attn.o_proj.bias,
          layer.post_attention_layernorm.weight, gu[0], gu[1], mlp.down_proj.weight,
          mlp.down_proj.bias)
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not (
            in_cpu_layout(t) if t.dim() == 2 else t.is_contiguous())) for t in ts):
        return None
    return tuple(None if t is None else t.detach() for t in ts)


def _weights(model: nn.Module) -> list[tuple[tuple, tuple]] | None:
    """Per layer (the weights as tensors, as numpy), or None where a layer cannot fuse."""
    key = _key(model)
    cached = model.__dict__.get("_cpu_fused")
    if cached is None or cached[0] != key:
        ws = [_layer_weights(layer) for layer in model.layers]
        ws = None if any(w is None for w in ws) else [(w, tuple(_np(t) for t in w))
                                                      for w in ws]
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
        return _one(model, x, meta, [w[1] for w in ws])
    return _rows(model, x, meta, ws)


def _one(model: nn.Module, x: torch.Tensor, meta, ws: list[tuple]) -> int:
    """One sequence: each layer one compiled call (cpu_jit_layer.layer)."""
    step = meta.plan.jit
    cache = meta.kv_cache
    attn = model.layers[0].self_attn
    lk = layer_kind(cache.format, attn.head_dim)
    cos, sin = (t.float().view(1, -1).numpy() for t in meta.rope)
    xv = x.view(-1).numpy()
    eps = model.layers[0].input_layernorm.eps
    threads = torch.get_num_threads()
    for i, w in enumerate(ws):
        k, v = cache.layers[i]
        if not cpu_jit.decoder_layer(xv, w, eps, cos, sin, lk.rot, step.blocks, step.offsets,
                                     (*_views(k), *_views(v)), step.tables, step.lens,
                                     step.max_len, attn.scale, lk.kind, lk.offset, lk.qmax,
                                     lk.symmetric, threads):
            return i
    return len(ws)


def _rows(model: nn.Module, x: torch.Tensor, meta, ws: list[tuple[tuple, tuple]]) -> int:
    """Several sequences (x (S, hidden)): eight calls a layer, no module."""
    step = meta.plan.jit
    cache = meta.kv_cache
    lk = layer_kind(cache.format, model.layers[0].self_attn.head_dim)
    cos, sin = (t.float() for t in meta.rope)  # (S, 1, D) each
    for i, (layer, (w, wn)) in enumerate(zip(model.layers, ws, strict=True)):
        _, wqkv, bqkv, wo, bo, _, wgu, bgu, wd, bd = w
        h = _norm(x, w[0], wn[0], layer.input_layernorm.eps)
        qkv = linear(h, wqkv, bqkv)  # (S, (Hq + 2 Hkv) * D)
        k, v = cache.layers[i]
        o = compiled_layer(qkv, cos, sin, k, v, step, lk, layer.self_attn.scale)  # (S, Hq D)
        if o is None:  # the kernel failed to compile: nothing written, the modules go on
            return i
        _add_linear(x, o, wo, bo)
        gu = linear(_norm(x, w[5], wn[5], layer.post_attention_layernorm.eps), wgu, bgu)
        n = gu.shape[1] // 2  # gu (S, 2 I): gate, up
        _add_linear(x, nn.functional.silu(gu[:, :n]).mul_(gu[:, n:]), wd, bd)
    return len(ws)


def _norm(x: torch.Tensor, w: torch.Tensor, wn: np.ndarray, eps: float) -> torch.Tensor:
    """RMSNorm of the rows x (S, H) with weight w (wn: its numpy view), compiled."""
    out = cpu_jit.rms_norm(x.numpy(), wn, eps) if cpu_compiled_on() else None
    return nn.functional.rms_norm(x, w.shape, w, eps) if out is None else \
        torch.from_numpy(out)


def _add_linear(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                ) -> None:
    """x += a @ w^T (+ b), in place: one addmm_."""
    x.addmm_(a, w.t())
    if b is not None:
        x.add_(b)
