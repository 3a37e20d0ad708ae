"""The ``edgekv`` command line: chat, serve, generate, formats."""

from __future__ import annotations

import functools
import sys

import click

from edgekv import __version__
from edgekv.cli.errors import InputError, user_errors
from edgekv.names import EVICTION_POLICIES
from edgekv.names import KV_FORMATS as FORMATS
from edgekv.names import KV_VARIANTS as VARIANTS
from edgekv.text_input import read_stdin, reencode, replaced_notice

# Nothing above imports torch or transformers: ``edgekv --help`` and the parsing of every
# subcommand stay fast. Heavy modules are imported inside the command bodies.


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekv")
def main() -> None:
    """EdgeKV: LLM inference with a paged, quantized KV cache."""


def model_options(fn):
    """Options shared by the commands that load a model."""
    opts = [
        click.option("--model", default=None, help="HF-format model dir or hub id "
                     "(default: the bundled demo model)."),
        click.option("--kv", "kv_format", default="int8", show_default=True,
                     callback=_kv_format, help="KV cache format: one of "
                     f"{', '.join(FORMATS + VARIANTS)}; one per layer, comma-separated; or "
                     "auto[:BITS] (per-layer formats chosen by a probe within BITS average "
                     "bits per value, default 5)."),
        click.option("--calibration", type=click.Path(dir_okay=False), default=None,
                     help="Text the --kv auto probe measures on (default: the model's "
                     "heldout.txt, else the demo model's)."),
        click.option("--target-context", type=click.IntRange(1), default=None,
                     help="Tokens --kv-memory must hold; with --kv auto, the storage "
                     "(one format, per layer, or age tiers) with the least predicted KL "
                     "that holds them."),
        click.option("--kv-memory", default=None, help="KV pool size, e.g. 256MiB "
                     "(default: sized from free memory)."),
        click.option("--block-size", type=click.IntRange(1), default=16, show_default=True,
                     help="Tokens per KV block."),
        click.option("--exact-window", type=click.IntRange(0), default=0, show_default=True,
                     help="Newest tokens of each sequence also kept in fp16 and read "
                     "exact (quantized formats, no eviction)."),
        click.option("--kv-residual", "kv_residual", type=click.IntRange(0), default=None,
                     hidden=True),  # the old name of --exact-window, still accepted
        click.option("--kv-tiers", default=None, callback=_kv_tiers,
                     help="Age tiers instead of one --kv format, newest first, e.g. "
                     "fp16:128,int8:2048,int4: each sequence's newest 128 tokens also exact, "
                     "the next 2,048 in int8, everything older in int4."),
        click.option("--eviction", type=click.Choice(EVICTION_POLICIES), default=None,
                     help="Keep each sequence inside --max-kv-tokens by evicting blocks "
                     "(default: no eviction)."),
        click.option("--max-kv-tokens", type=click.IntRange(1), default=None,
                     help="Per-sequence KV budget in tokens for --eviction (default: the "
                     "whole KV pool)."),
        click.option("--sink-tokens", type=click.IntRange(0), default=None,
                     help="First tokens --eviction always keeps (default: one block)."),
        click.option("--window-tokens", type=click.IntRange(0), default=None,
                     help="Newest tokens --eviction always keeps (default: half the "
                     "budget)."),
        click.option("--offload-memory", default="0", show_default=True,
                     help="Host memory for KV blocks swapped out when the pool runs short, "
                     "e.g. 1GiB (0: off; preempted sequences are recomputed)."),
        click.option("--weights", type=click.Choice(["int8", "nf4"]), default=None,
                     help="Quantize weights with bitsandbytes."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if "
                     "available)."),
        click.option("--dtype", default=None, help="float32 | float16 | bfloat16 (default: "
                     "the checkpoint's)."),
        click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1)),
        click.option("--temperature", default=0.8, show_default=True,
                     type=click.FloatRange(0)),
        click.option("--top-p", default=0.95, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True)),
        click.option("--seed", default=0, show_default=True, type=int),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _kv_format(ctx, param, value: str) -> str:
    """--kv: one name, one per layer, or auto[:BITS]; a bad one is a usage error (decided
    without torch: edgekv.names, edgekv.auto.spec)."""
    from edgekv.auto.spec import parse_auto

    try:
        if parse_auto(value) is not None:
            return value
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    for name in value.split(","):
        if name.strip() not in FORMATS + VARIANTS:
            valid = ", ".join(repr(f) for f in FORMATS + VARIANTS)
            raise click.BadParameter(f"{name.strip()!r} is not one of {valid} (or one per "
                                     f"layer, comma-separated, or auto[:BITS])")
    return value


def _kv_tiers(ctx, param, value: str | None) -> str | None:
    """--kv-tiers: a bad spec is a usage error (edgekv.tiers.spec imports no torch)."""
    from edgekv.tiers.spec import parse_tiers

    if value is None:
        return None
    try:
        parse_tiers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


def build(opts: dict, **llm_options):
    """(LLM, SamplingParams) from the shared options (and ``llm_options`` for LLM); bad
    input is a one-line error (exit code 2), found before the model loads where the
    options alone show it."""
    from edgekv import LLM, SamplingParams, parse_memory
    from edgekv.eviction import EvictionConfig

    with user_errors():
        eviction = None
        if opts["eviction"] is not None:
            eviction = EvictionConfig(opts["eviction"], max_kv_tokens=opts["max_kv_tokens"],
                                      sink_tokens=opts["sink_tokens"],
                                      window_tokens=opts["window_tokens"])
        elif any(opts[k] is not None for k in ("max_kv_tokens", "sink_tokens",
                                               "window_tokens")):
            raise ValueError("--max-kv-tokens, --sink-tokens and --window-tokens need "
                             "--eviction")
        if opts["kv_memory"] not in (None, "auto"):
            parse_memory(opts["kv_memory"])
        offload = opts["offload_memory"]
        offload = 0 if str(offload).strip() == "0" else offload
        if offload:
            parse_memory(offload)
        params = SamplingParams(max_tokens=opts["max_tokens"],
                                temperature=opts["temperature"], top_p=opts["top_p"],
                                seed=opts["seed"])
        try:
            llm = LLM(opts["model"], kv_format=opts["kv_format"],
                      kv_memory=opts["kv_memory"], eviction=eviction,
                      weights=opts["weights"], device=opts["device"], dtype=opts["dtype"],
                      seed=opts["seed"],
                      exact_window=opts["exact_window"] or opts["kv_residual"] or 0,
                      offload_memory=offload, target_context=opts["target_context"],
                      kv_calibration=opts["calibration"], kv_tiers=opts["kv_tiers"],
                      block_size=opts.get("block_size", 16), **llm_options)
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            raise ValueError(f"out of memory loading the model and its KV pool "
                             f"(--kv-memory {opts['kv_memory'] or 'auto'}): give a smaller "
                             f"--kv-memory, --kv int4 or --weights int8") from None
    if llm.kv_decision is not None:  # what the budget controller chose, one line
        d = llm.kv_decision
        click.echo(d.choice.summary(opts["target_context"], d.source), err=True)
    elif llm.kv_auto is not None:  # what the probe chose, one line
        mc = llm.model_config
        click.echo(llm.kv_auto.summary(2 * mc.num_layers * mc.num_kv_heads * mc.head_dim),
                   err=True)
    return llm, params


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed (CUDA or host), not a bug."""
    import torch

    return (isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(e))


def quiet_libraries(fn):
    """Keep library progress bars and notices off the chat: transformers' warnings, and
    bitsandbytes' notices about optional kernels it could not find."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import logging
        import os
        import warnings

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        for name in ("transformers", "bitsandbytes", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"(transformers|bitsandbytes)(\.|$)")
        return fn(*args, **kwargs)

    return wrapper


@main.command()
@model_options
@click.option("--system", default=None, help="System prompt.")
@quiet_libraries
def chat(system: str | None, **opts) -> None:
    """Chat in the terminal; the history stays in the KV cache. /help lists commands."""
    from edgekv.cli.chat import ChatREPL, stdin_lines
    from edgekv.config import describe_kv

    llm, params = build(opts)
    with user_errors():  # a model without a tokenizer cannot chat
        repl = ChatREPL(llm, params, system)
    interactive = sys.stdin.isatty()
    if interactive:
        s = llm.kv_stats()
        kv = describe_kv(s)
        click.echo(f"edgekv chat: {llm.model_dir.name}, KV {kv} "
                   f"({s['bytes_per_token']:,} B/token), {s['blocks_total']} blocks of "
                   f"{s['block_size']}. /help for commands, Ctrl-D to quit.")
    repl.run(stdin_lines(interactive, notify=repl.say), interactive)


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="EDGEKV_API_KEY",
              help="Clients must send Authorization: Bearer KEY (default: no auth; also "
              "read from EDGEKV_API_KEY).")
@click.option("--max-num-seqs", default=32, show_default=True, type=click.IntRange(1),
              help="Sequences decoded together.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait beyond those; more get 429.")
@click.option("--served-model-name", default=None,
              help="The model's name in the API (default: the model directory's name).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads for the model on a CPU (default: one less than the CPUs, so "
              "that the HTTP side keeps one, and every CPU for a batch's attention).")
@quiet_libraries
def serve(host: str, port: int, api_key: str | None, max_num_seqs: int, max_queue: int,
          served_model_name: str | None, threads: int | None, **opts) -> None:
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)."""
    from edgekv.serve.run import serve as run_server

    run_server(host, port, api_key, max_num_seqs, max_queue, served_model_name, threads, opts)


@main.command()
@model_options
@click.argument("prompt", required=False)
@quiet_libraries
def generate(prompt: str | None, **opts) -> None:
    """Complete one PROMPT (argument or stdin) and print it to stdout as it streams."""
    if prompt is None:
        if sys.stdin.isatty():
            raise InputError("give a PROMPT argument or pipe one on stdin")
        prompt, replaced = read_stdin()
    else:  # bytes the locale could not decode reach argv as surrogates
        prompt, replaced = reencode(prompt)
    if replaced:
        click.echo(replaced_notice(replaced), err=True)
    if not prompt.strip():
        raise InputError("the prompt is empty")
    llm, params = build(opts)
    if llm.tokenizer is None:
        raise InputError(f"{llm.model_dir} has no tokenizer: generate needs one to read "
                         f"the prompt")
    try:
        with user_errors():  # e.g. a prompt longer than the model's context
            for piece in llm.stream(prompt, params):
                click.echo(piece, nl=False)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as a shell expects
        click.echo()
        sys.exit(130)
    click.echo()
    if llm.last_finish_reason == "context":
        click.echo(f"(stopped: the model's context of {llm.model_config.max_position} "
                   f"tokens is full; --eviction goes on past it)", err=True)


@main.command()
@click.option("--layers", default=32, show_default=True, help="Transformer layers.")
@click.option("--kv-heads", default=8, show_default=True, help="KV heads per layer.")
@click.option("--head-dim", default=128, show_default=True, help="Values per head.")
@click.option("--variants", is_flag=True, help="Also list the alternative int formats.")
def formats(layers: int, kv_heads: int, head_dim: int, variants: bool) -> None:
    """KV formats and their exact cost per token (K+V, all layers, scales included)."""
    from edgekv.quant import get_format
    from edgekv.tables import text_table

    if min(layers, kv_heads, head_dim) <= 0:
        raise click.UsageError("--layers, --kv-heads and --head-dim must be positive")
    fp16 = get_format("fp16").bytes_per_token(kv_heads, head_dim) * layers
    rows, unusable = [], []
    for name in FORMATS + (VARIANTS if variants else ()):
        try:
            b = get_format(name).bytes_per_token(kv_heads, head_dim) * layers
        except ValueError as e:
            rows.append((name, "n/a", "-"))
            unusable.append(f"{name}  n/a: {e}")
            continue
        rows.append((name, f"{b:,}", f"{b / fp16:.3f}x"))
    for line in text_table(rows, ("format", "bytes/token", "vs fp16"), align="lrr") + unusable:
        click.echo(line)


from edgekv.cli.plan import plan  # noqa: E402  (commands in their own modules join the group here)

main.add_command(plan)

from edgekv.eval.cli import eval_command  # noqa: E402

main.add_command(eval_command)
