"""The ``edgekv eval`` command: a progress bar, the table row by row, files at the end."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from edgekv.cli.errors import InputError, describe
from edgekv.names import KV_FORMATS as FORMATS  # no torch: parsing stays fast
from edgekv.names import KV_VARIANTS as VARIANTS
from edgekv.names import renamed

EvalInputError = InputError  # bad input: one line ("Error: ..."), exit code 2


def check_output(path: str | None, option: str) -> None:
    """A ValueError now, before any measuring, if ``path`` cannot be written at the end."""
    if not path:
        return
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory, give a file name")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")


def _names(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


def _numbers(value: str, kind, what: str) -> tuple:
    try:
        return tuple(kind(s) for s in _names(value))
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of numbers, got "
                         f"{value!r}") from None


@click.command("eval")
@click.option("--model", default=None, help="HF-format model dir or hub id (default: the "
              "bundled demo model, on its held-out text).")
@click.option("--formats", default="fp16,int8,int4", show_default=True,
              help=f"Comma-separated KV formats, or 'all'. Formats: {', '.join(FORMATS)}; "
              f"variants: {', '.join(VARIANTS)}.")
@click.option("--eviction", default="", help="Comma-separated eviction policies, each "
              "measured for every format and budget (see --eviction-chunk).")
@click.option("--budgets", default="0.125,0.25,0.5", show_default=True,
              help="KV budgets per sequence: fractions (<= 1) of the window, or tokens.")
@click.option("--exact-window", "exact_window", default="0", show_default=True,
              help="Comma-separated exact windows: each quantized format is also "
              "measured with its newest N tokens read unquantized (LLM(exact_window=N)).")
@click.option("--kv-residual", "kv_residual", default=None, hidden=True)  # old name
@click.option("--tiers", "tiers", multiple=True, help="Age tiers to measure as one more row "
              "each (repeat the option), e.g. --tiers fp16:128,int8:256,int4.")
@click.option("--eviction-chunk", type=click.IntRange(1), default=1, show_default=True,
              help="Tokens per step through an eviction budget: 1 reads it as decode does; "
              "more streams the text as a long prompt prefilled in chunks (a chunk's last "
              "queries score the blocks, as SnapKV's observation window).")
@click.option("--text", default=None, help="Text file (.txt) or dataset (.jsonl/.json/.csv "
              "with a 'text' field) (default: the model's heldout.txt).")
@click.option("--window", type=int, default=None, help="Perplexity window in tokens "
              "(default: the model's context, at most 1024).")
@click.option("--stride", type=int, default=None, help="Window stride (default: the window).")
@click.option("--max-windows", type=int, default=None, help="Use the first N windows only.")
@click.option("--decode-windows", type=int, default=2, show_default=True,
              help="Windows scored token by token for KL / top-1.")
@click.option("--prompts", type=int, default=8, show_default=True,
              help="Prompts for greedy continuation agreement.")
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--gen-len", type=int, default=32, show_default=True)
@click.option("--layer-tokens", type=int, default=512, show_default=True,
              help="Tokens for the per-layer attention error (0: skip).")
@click.option("--peers", default="auto", show_default=True,
              help="transformers caches to compare: auto (those installed), none, or a list "
              "of hf, quanto-int4, quanto-int2, hqq-int4, hqq-int2.")
@click.option("--peer-residual", type=int, default=None, help="residual_length of the "
              "transformers quantized caches: newest tokens kept unquantized (default: "
              "transformers' 128; 0: none).")
@click.option("--passkey/--no-passkey", default=True, show_default=True,
              help="Passkey retrieval (long-context models only).")
@click.option("--passkey-lengths", default="", help="Passkey prompt lengths in tokens.")
@click.option("--dtype", default="float32", show_default=True,
              help="Weights / activations dtype.")
@click.option("--device", default=None, help="cpu, cuda (default: cuda if available).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", default=None, help="Write the rows as JSON.")
@click.option("--csv", "csv_out", default=None, help="Write the rows as CSV.")
@click.option("--markdown", "md_out", default=None, help="Write the table as Markdown.")
@click.option("--plot", "plot_out", default=None, help="Draw Δppl / KL to a PNG "
              "(needs matplotlib).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
def eval_command(formats: str, eviction: str, budgets: str, passkey_lengths: str,
                 exact_window: str, kv_residual: str | None, tiers: tuple[str, ...],
                 peers: str, json_out, csv_out, md_out, plot_out, progress, **opts) -> None:
    """Measure what each KV format (and eviction policy) costs in accuracy, against the
    fp16 cache on the same model and tokens: perplexity, KL and top-1 agreement, greedy
    continuation agreement, per-layer attention error, passkey retrieval."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from .config import EvalConfig

    if kv_residual is not None:
        click.echo("note: --kv-residual is now --exact-window", err=True)
    try:  # every check the options alone allow, before anything is loaded
        names = FORMATS + VARIANTS if formats.strip() == "all" else _names(formats)
        peer_sel = peers if peers in ("auto", "none") else _names(peers)
        cfg = EvalConfig(formats=names, eviction=_names(eviction),
                         budgets=_numbers(budgets, float, "--budgets"),
                         passkey_lengths=_numbers(passkey_lengths, int, "--passkey-lengths"),
                         exact_window=_numbers(renamed(exact_window, kv_residual,
                                                       "--exact-window", "--kv-residual",
                                                       "0"), int, "--exact-window"),
                         tiers=tuple(tiers), peers=peer_sel, **opts)
        for path, option in ((json_out, "--json"), (csv_out, "--csv"), (md_out, "--markdown"),
                             (plot_out, "--plot")):
            check_output(path, option)
        if plot_out:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError("--plot needs matplotlib: pip install 'edgekv[plot]'")
    except ValueError as e:
        raise InputError(describe(e)) from None
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from . import report
    from .runner import run

    hf_logging.disable_progress_bar()
    try:
        bar = tqdm(total=0, disable=progress is False if progress is not None else None,
                   unit="step", dynamic_ncols=True, leave=False)
        started = time.monotonic()

        def on_progress(done: int, total: int, desc: str) -> None:
            bar.total = total
            bar.set_description_str(desc[:40])
            bar.update(done - bar.n)

        shown = 0

        def on_row(row: dict) -> None:
            nonlocal shown
            if not shown:  # the header once the input is known to be good
                tqdm.write(report.table_header())
            shown += 1
            tqdm.write(report.table_line(row))

        rows = run(cfg, progress=on_progress, on_row=on_row)
        bar.close()
    except (ValueError, OSError) as e:
        raise InputError(describe(e)) from None
    for line in report.legend(rows):
        click.echo(line)
    click.echo(f"{len(rows)} configurations in {time.monotonic() - started:.0f} s")
    if json_out:
        report.write_json(rows, json_out)
    if csv_out:
        report.write_csv(rows, csv_out)
    if md_out:
        report.write_markdown(rows, md_out)
    if plot_out:
        from .plot import plot

        plot(rows, plot_out)
