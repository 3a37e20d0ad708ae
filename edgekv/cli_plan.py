"""``edgekv plan``: what fits on a GPU of a given size, from the model's config alone."""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import click

from edgekv.names import KNOWN_MODELS  # no torch: parsing stays fast; edgekv.plan is heavy

if TYPE_CHECKING:
    from edgekv.plan import MemoryPlan

GiB, MiB = 2**30, 2**20


@click.command("plan")
@click.option("--model", required=True, help="config.json, model dir, hub id, or a known "
              f"name: {', '.join(KNOWN_MODELS)}.")
@click.option("--gpu-memory", required=True, help="The card's total memory, e.g. 8GiB.")
@click.option("--context", type=click.IntRange(1), default=None,
              help="Tokens per sequence to hold (default: the model's maximum).")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True,
              help="Sequences held at once.")
@click.option("--block-size", type=int, default=16, show_default=True,
              help="Tokens per KV block.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: str, gpu_memory: str, context: int | None, batch: int, block_size: int,
         as_json: bool) -> None:
    """What fits: weights (fp16 / int8 / nf4), KV format and context, for one GPU.

    Reads only the model's config (no weights, no GPU needed).
    """
    from edgekv.plan import plan_memory, resolve_model

    try:
        p = plan_memory(resolve_model(model), gpu_memory, context, batch, block_size)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        click.echo(render(p, model))


def render(p: MemoryPlan, model_arg: str) -> str:
    """The plan as a readable report (what ``edgekv plan`` prints)."""
    from edgekv.plan import KNOWN_MODELS, num_params
    from edgekv.plan.headroom import FRAGMENTATION_SHARE
    from edgekv.plan.weights import LLM_WEIGHTS

    c, lines = p.spec.config, []
    req = f"{p.batch} x {p.context:,}"
    lines.append(f"{p.spec.name} ({p.spec.source}) on {_gib(p.gpu_memory)}: {req} tokens, "
                 f"blocks of {p.block_size}")
    lines.append(f"  {num_params(c) / 1e9:.2f} B parameters: {c.num_layers} layers, "
                 f"{c.num_heads} query / {c.num_kv_heads} KV heads x {c.head_dim}, hidden "
                 f"{c.hidden_size:,}, MLP {c.intermediate_size:,}")
    lines.append(f"  vocab {c.vocab_size:,}{' (tied embeddings)' if c.tie_word_embeddings else ''}"
                 f", max context {c.max_position:,}")
    lines += ["", "Weights (int8/nf4 by bitsandbytes; embeddings, lm_head, norms stay 16-bit):"]
    for m, w in p.weights.items():
        detail = "" if not w.quantized_params else (
            f"   {w.quantized_params / 1e9:.2f} B quantized ({_gib(w.quantized_bytes)}), "
            f"{w.kept_params / 1e9:.2f} B kept 16-bit ({_gib(w.kept_bytes)})")
        lines.append(f"  {m:<5} {_gib(w.total_bytes):>10}{detail}")
    h = p.headroom.get("nf4") or next(iter(p.headroom.values()))
    lines += ["", f"Headroom: CUDA context {_mib(h.cuda_context)}, activations "
                  f"{_mib(h.activations)} (prefill chunk {p.chunk_tokens:,}), logits "
                  f"{_mib(h.logits)},",
              f"  int8/nf4 dequant buffer {_mib(h.dequant)}, allocator fragmentation "
              f"{_mib(h.fragmentation)} ({FRAGMENTATION_SHARE:.0%})"]
    lines += ["", f"KV bytes/token ({c.num_layers} layers, K+V, scales included):",
              "  " + ", ".join(f"{f} {b:,}" for f, b in p.kv_bytes_per_token.items())]
    head = (f"{'weights':<8} {'kv':<9} {'KV budget':>10} {'KV tokens':>10} {'max context':>12} "
            f"{'max batch':>10}  {req}")
    lines += ["", head, "-" * len(head)]
    previous = None
    for r in p.rows:
        if previous is not None and r.weights != previous:
            lines.append("")
        previous = r.weights
        budget = _gib(r.kv_budget_bytes) if r.fits_weights else "-"
        lines.append(f"{r.weights:<8} {r.kv_format:<9} {budget:>10} {r.kv_tokens:>10,} "
                     f"{r.max_context:>12,} {r.max_batch:>10,}  {r.status}")
    lines.append("")
    rec = p.recommendation
    if rec is None:
        lines.append(f"Nothing fits: even nf4 weights leave no room for KV in "
                     f"{_gib(p.gpu_memory)}.")
    else:
        r = rec.row
        lines.append(f"Recommended: {r.weights} weights + {r.kv_format} KV,")
        lines.append(f"  {rec.reason}:")
        cmd_model = KNOWN_MODELS[model_arg.lower()][0] if model_arg.lower() in KNOWN_MODELS \
            else model_arg
        weights = LLM_WEIGHTS[r.weights]
        flag = f" --weights {weights}" if weights else ""
        lines.append(f"  edgekv chat --model {cmd_model}{flag} --kv {r.kv_format} "
                     f"--kv-memory {r.kv_budget_bytes // MiB}MiB")
    lines += [textwrap.fill(f"Note: {n}.", 100, subsequent_indent="  ") for n in p.spec.notes]
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB or n == 0 else f"{n / MiB:.1f} MiB"
