"""The options every command that loads a model shares, and loading it from them.

``model_options`` adds them to a command; ``build`` checks them (a user's mistake: one line,
exit 2) and makes the ``LLM``; ``quiet_libraries`` keeps library notices off the terminal.
Nothing at module level imports torch: ``edgekv --help`` stays fast.
"""

from __future__ import annotations

import functools

import click

from edgekv.cli.errors import user_errors
from edgekv.names import EVICTION_POLICIES, renamed
from edgekv.names import KV_FORMATS as FORMATS
from edgekv.names import KV_VARIANTS as VARIANTS


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


def load(opts: dict):
    """``build`` for a command a user waits on: Ctrl-C while the model loads leaves quietly
    with exit code 130, as Ctrl-C while it streams does (not a traceback, not exit 1)."""
    try:
        return build(opts)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        raise SystemExit(130) from None


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
        window = renamed(opts["exact_window"], opts["kv_residual"], "--exact-window",
                         "--kv-residual", 0)
        if opts["kv_residual"] is not None:
            click.echo("note: --kv-residual is now --exact-window", err=True)
        params = SamplingParams(max_tokens=opts["max_tokens"],
                                temperature=opts["temperature"], top_p=opts["top_p"],
                                seed=opts["seed"])
        try:
            llm = LLM(opts["model"], kv_format=opts["kv_format"],
                      kv_memory=opts["kv_memory"], eviction=eviction,
                      weights=opts["weights"], device=opts["device"], dtype=opts["dtype"],
                      seed=opts["seed"],
                      exact_window=window,
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
