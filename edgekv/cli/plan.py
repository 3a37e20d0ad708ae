"""``edgekv plan``: what fits on a GPU of a given size, from the model's config alone."""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import click

from edgekv.cli.errors import user_errors
from edgekv.names import KNOWN_MODELS  # no torch: parsing stays fast; edgekv.plan is heavy
from edgekv.tables import text_table
from edgekv.units import MiB, gib, mib, size_arg

if TYPE_CHECKING:
    from edgekv.plan import MemoryPlan


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
@click.option("--probe", is_flag=True, help="Load the model (a checkpoint directory) and "
              "probe what each KV format costs it, for this model's own predicted quality "
              "and per-layer choices (default: the demo model's measurement as a prior).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Text the --probe measures on (default: the model's heldout.txt, else "
              "the demo model's).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: str, gpu_memory: str, context: int | None, batch: int, block_size: int,
         probe: bool, calibration: str | None, as_json: bool) -> None:
    """What fits: weights (fp16 / int8 / nf4), KV storage and context, for one GPU, and
    the KV storage (uniform, per layer, age tiers) with the least predicted KL.

    Reads only the model's config (no weights, no GPU needed), unless --probe.
    """
    from edgekv.plan import plan_memory, resolve_model

    try:
        spec = resolve_model(model)
        quality = result = None
        if probe:
            with user_errors():  # an unreadable checkpoint: one line
                quality, result = _probe(model, calibration)
        elif calibration is not None:
            raise ValueError("--calibration is the text --probe measures on: add --probe")
        p = plan_memory(spec, gpu_memory, context, batch, block_size, quality=quality,
                        probe=result)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        click.echo(render(p, model))


def _probe(model: str, calibration: str | None):
    """(QualityModel, ProbeResult) of the checkpoint at ``model``: the probe
    ``kv_format="auto"`` runs (stored per model, so a second plan reads it back)."""
    from pathlib import Path

    from edgekv import LLM
    from edgekv.auto.quality import QualityModel

    if not (Path(model).expanduser() / "config.json").is_file():
        raise ValueError(f"--probe loads the model's weights: give its checkpoint directory, "
                         f"not {model!r}")
    from edgekv.cli.options import out_of_memory

    try:
        llm = LLM(model, kv_format="auto", kv_memory="64MiB", kv_calibration=calibration)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise ValueError(f"out of memory loading {model} for --probe: probe it where its "
                         f"fp16 weights fit (the result is kept per checkpoint)") from None
    probe = llm.kv_probe
    return QualityModel.from_probe(probe, f"this model's probe ({probe.tokens} tokens of "
                                          f"calibration text)"), probe


def render(p: MemoryPlan, model_arg: str) -> str:
    """The plan as a readable report (what ``edgekv plan`` prints)."""
    from edgekv.plan import num_params
    from edgekv.plan.headroom import FRAGMENTATION_SHARE

    c, lines = p.spec.config, []
    req = f"{p.batch} x {p.context:,}"
    lines.append(f"{p.spec.name} ({p.spec.source}) on {gib(p.gpu_memory)}: {req} tokens, "
                 f"blocks of {p.block_size}")
    lines.append(f"  {num_params(c) / 1e9:.2f} B parameters: {c.num_layers} layers, "
                 f"{c.num_heads} query / {c.num_kv_heads} KV heads x {c.head_dim}, hidden "
                 f"{c.hidden_size:,}, MLP {c.intermediate_size:,}")
    lines.append(f"  vocab {c.vocab_size:,}{' (tied embeddings)' if c.tie_word_embeddings else ''}"
                 f", max context {c.max_position:,}")
    lines += ["", "Weights (int8/nf4 by bitsandbytes; embeddings, lm_head, norms stay 16-bit):"]
    lines += text_table([(m, gib(w.total_bytes), "" if not w.quantized_params else
                          f"{w.quantized_params / 1e9:.2f} B quantized ({gib(w.quantized_bytes)}), "
                          f"{w.kept_params / 1e9:.2f} B kept 16-bit ({gib(w.kept_bytes)})")
                         for m, w in p.weights.items()], align="lr", indent="  ")
    h = p.headroom.get("nf4") or next(iter(p.headroom.values()))
    lines += ["", f"Headroom: CUDA context {mib(h.cuda_context)}, activations "
                  f"{mib(h.activations)} (prefill chunk {p.chunk_tokens:,}), logits "
                  f"{mib(h.logits)},",
              f"  int8/nf4 dequant buffer {mib(h.dequant)}, allocator fragmentation "
              f"{mib(h.fragmentation)} ({FRAGMENTATION_SHARE:.0%})"]
    lines += ["", f"KV bytes/token ({c.num_layers} layers, K+V, scales included):",
              "  " + ", ".join(f"{f} {b:,}" for f, b in p.kv_bytes_per_token.items())]
    rows: list[tuple | None] = []
    for r in p.rows:
        if rows and r.weights != rows[-1][0]:
            rows.append(None)  # a blank line between the weight modes
        rows.append((r.weights, r.kv_format, gib(r.kv_budget_bytes) if r.fits_weights else "-",
                     f"{r.kv_tokens:,}", f"{r.max_context:,}", f"{r.max_batch:,}", r.status))
    head = ("weights", "kv", "KV budget", "KV tokens", "max context", "max batch", req)
    lines += ["", *text_table(rows, head, align="llrrrrl"), ""]
    lines += _kv_choice(p, model_arg)
    lines += [textwrap.fill(f"Note: {n}.", 100, subsequent_indent="  ") for n in p.spec.notes]
    return "\n".join(lines)


def _kv_choice(p: MemoryPlan, model_arg: str) -> list[str]:
    """The budget controller's candidates for the recommended weights, and its choice."""
    from edgekv.plan import KNOWN_MODELS
    from edgekv.plan.weights import LLM_WEIGHTS

    rec = p.kv_choice
    if rec is None:
        return [f"Nothing fits: even nf4 weights leave no room for KV in {gib(p.gpu_memory)}."]
    d = rec.decision
    budget = p.gpu_memory - p.weights[rec.weights].total_bytes - \
        p.headroom[rec.weights].total
    lines = [f"KV storage for {rec.weights} weights ({gib(budget)} for KV), predicted "
             f"quality at the end of {p.context:,} tokens;",
             textwrap.fill(f"quality from {d.source}.", 100, initial_indent="  ",
                           subsequent_indent="  ")]
    rows = [(c.label, f"{round(c.bytes_per_token):,}", f"{c.tokens_per_seq:,}",
             "-" if c.predicted_kl is None else f"{c.predicted_kl:.2e}",
             "-" if c.delta_ppl is None else f"{100 * c.delta_ppl:+.3f}%",
             "<- chosen" if c == d.choice else ("" if c.fits else "(does not fit)"))
            for c in sorted(d.candidates, key=lambda c: (not c.fits, c.predicted_kl is None,
                                                         c.predicted_kl or 0.0))]
    lines += text_table(rows, ("storage", "B/token", "tokens/seq", "KL", "Δppl", ""),
                        align="lrrrrl", indent="  ")
    c = d.choice
    lines.append("")
    if c is None:
        lines.append(f"Nothing holds {p.batch} sequence(s) of two blocks each in "
                     f"{gib(budget)}: give a larger card, a smaller --batch, or quantized "
                     f"weights.")
        return lines
    kl = "" if c.predicted_kl is None or d.needs == "eviction" else \
        f" (predicted KL {c.predicted_kl:.2e}, Δppl {100 * c.delta_ppl:+.3f}%)"
    lines.append(f"Recommended: {rec.weights} weights + {c.label} KV{kl}")
    lines += textwrap.wrap(f"({rec.reason}):", 100, initial_indent="  ",
                           subsequent_indent="  ")
    cmd_model = KNOWN_MODELS[model_arg.lower()][0] if model_arg.lower() in KNOWN_MODELS \
        else model_arg
    weights = LLM_WEIGHTS[rec.weights]
    flag = f" --weights {weights}" if weights else ""
    extra = {"offload": f" --offload-memory {size_arg(-(-d.offload_bytes // MiB) * MiB)}",
             "eviction": f" --eviction streaming --max-kv-tokens {c.tokens_per_seq}"
             }.get(d.needs, "")
    if p.block_size != 16:
        extra += f" --block-size {p.block_size}"
    cmd = "chat" if p.batch == 1 else "serve"  # more sequences at once: a server's
    if p.batch > 1:
        extra += f" --max-num-seqs {p.batch}"
    lines.append(f"  edgekv {cmd} --model {cmd_model}{flag} {c.flags}{extra}")
    if d.needs == "eviction":
        lines += textwrap.wrap("What eviction costs is not predicted (the tokens it drops "
                               "depend on the text): edgekv eval --eviction measures it.", 100)
    if d.source.startswith("prior"):
        lines += textwrap.wrap("The KL is the demo model's, mapped onto this model's layers: "
                               "it ranks the choices; with the checkpoint, --probe measures "
                               "this model's own.", 100)
    return lines
