"""One decoding sequence on a CPU: each decoder layer as one compiled call.

At batch 1 the torch path spends more time around a layer's four matmuls than in them
(kernels/cpu_jit_layer.py says why); this runs a layer's norms, projections, attention and
MLP in one call over the weights' own memory. ``run`` is called by the decoder for a
decode step of one sequence that the runner planned for the compiled kernels; it returns
how many layers it ran (the modules run the rest: all of them where a layer cannot be
fused, e.g. Qwen3's q/k norms, bitsandbytes layers, non-fp32 weights).

The per-layer weight views are made once and kept on the model, checked against the
parameters' storage every step (a checkpoint copied in, or a moved model, rebuilds them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgekv.kernels import cpu_jit
from edgekv.kernels.cpu_compiled import _views, layer_kind

from .layers import RMSNorm, SwiGLU, fused_linear

_EMPTY = np.zeros(0, np.float32)


def _np(t: torch.Tensor | None) -> np.ndarray:
    return _EMPTY if t is None else t.detach().numpy()


def fusable(layer: nn.Module) -> bool:
    """Whether a decoder layer's attention can take the compiled decode layer at all (no
    q/k norms, q, k and v projections that fuse)."""
    attn = layer.self_attn
    return not hasattr(attn, "q_norm") and fused_linear(attn, ("q_proj", "k_proj",
                                                               "v_proj")) is not None


def _layer_weights(layer: nn.Module) -> tuple | None:
    """(ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd) as numpy, or None."""
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
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"
                              or not t.is_contiguous()) for t in ts):
        return None
    return tuple(_np(t) for t in ts)


def _weights(model: nn.Module) -> list[tuple] | None:
    key = tuple(p.data_ptr() for p in model.layers.parameters())
    cached = model.__dict__.get("_cpu_fused")
    if cached is None or cached[0] != key:
        ws = [_layer_weights(layer) for layer in model.layers]
        ws = None if any(w is None for w in ws) else ws
        key = tuple(p.data_ptr() for p in model.layers.parameters())  # after fusing
        cached = (key, ws)
        model.__dict__["_cpu_fused"] = cached
    return cached[1]


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook would see the layers' modules run (a fused call skips them)."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    mods = model.__dict__.get("_cpu_fused_modules")
    if mods is None:
        mods = model.__dict__["_cpu_fused_modules"] = list(model.layers.modules())
    return any(x._forward_hooks or x._forward_pre_hooks for x in mods)


def run(model: nn.Module, x: torch.Tensor, meta) -> int:
    """x (1, hidden) fp32, the embedded token, updated in place layer by layer; ``meta``
    the step's AttentionMetadata (its plan has ``jit``). Returns the layers run (0 where a
    layer cannot be fused, or a forward hook is registered: the modules run then)."""
    step = meta.plan.jit
    if x.shape[0] != 1 or x.dtype != torch.float32 or x.requires_grad or _hooked(model):
        return 0
    ws = _weights(model)
    if ws is None:
        return 0
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
