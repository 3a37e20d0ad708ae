"""``edgekv generate``: one prompt completed, streamed to stdout."""

from __future__ import annotations

import sys

import click

from edgekv.cli.errors import InputError, user_errors
from edgekv.cli.options import load, model_options, quiet_libraries
from edgekv.text_input import read_stdin, reencode, replaced_notice


@click.command()
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
    llm, params = load(opts)
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
