"""``edgekv chat``: the terminal chat (its loop: repl.py)."""

from __future__ import annotations

import sys

import click

from edgekv.cli.errors import user_errors
from edgekv.cli.options import load, model_options, quiet_libraries


@click.command()
@model_options
@click.option("--system", default=None, help="System prompt.")
@quiet_libraries
def chat(system: str | None, **opts) -> None:
    """Chat in the terminal; the history stays in the KV cache. /help lists commands."""
    from edgekv.cli.repl import ChatREPL, stdin_lines
    from edgekv.config import describe_kv

    llm, params = load(opts)
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
