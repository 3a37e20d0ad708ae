"""Per-layer relative error of the attention output, one layer at a time.

A reference run over an fp32 cache records what each attention layer received and what
it returned. A run over the format under test then feeds every attention layer the
reference's input (a forward pre-hook replaces it), so each layer's K/V are computed from
the same hidden states and the error measured at that layer is its cache format's alone,
not what earlier layers passed down:

    rel_err[l] = || attn_l(x_ref[l]; format cache) - attn_l(x_ref[l]; fp32 cache) ||
                 / || attn_l(x_ref[l]; fp32 cache) ||

"Attention output" is what ``PagedAttention.forward`` returns (after o_proj).
"""

from __future__ import annotations

import torch

from edgekv.models.attention import PagedAttention


def _attention_layers(model: torch.nn.Module) -> list[PagedAttention]:
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert layers, "the model has no PagedAttention layers"
    return layers


def capture(llm, ids: list[int], inputs: list[torch.Tensor] | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill ``ids`` through ``llm`` and return (inputs, outputs) of every attention
    layer, each (T, hidden) fp32 on the CPU. With ``inputs``, layer l is fed
    ``inputs[l]`` instead of what the layer below produced. The model is left unhooked."""
    layers = _attention_layers(llm.model)
    seen_in: list[torch.Tensor] = []
    seen_out: list[torch.Tensor] = []
    handles = []

    def pre(idx):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["x"]
            seen_in.append(x.detach().float().cpu())
            if inputs is None:
                return None
            x = inputs[idx].to(device=x.device, dtype=x.dtype)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})
        return hook

    def post(mod, args, kwargs, out):
        seen_out.append(out.detach().float().cpu())

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        llm.score(ids)
    finally:
        for h in handles:
            h.remove()
    assert len(seen_out) == len(layers), "one prefill should call every layer once"
    return seen_in, seen_out


def layer_errors(llm, ids: list[int], ref_inputs: list[torch.Tensor],
                 ref_outputs: list[torch.Tensor]) -> list[float]:
    """Relative error of each attention layer's output against the reference's, every
    layer fed the reference's input (see the module docstring)."""
    from .metrics import relative_error

    _, outs = capture(llm, ids, ref_inputs)
    return [relative_error(r, o) for r, o in zip(ref_outputs, outs, strict=True)]
