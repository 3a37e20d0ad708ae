"""The ``edgekv`` group: every command lives in its own module and joins the group here.

    chat.py      edgekv chat       (its loop: repl.py)
    generate.py  edgekv generate
    serve.py     edgekv serve      (the server: edgekv/serve/)
    formats.py   edgekv formats
    plan.py      edgekv plan
    eval         edgekv eval       (edgekv/eval/cli.py)

None of them imports torch or transformers at module level: ``edgekv --help`` and the
parsing of every command stay fast; heavy modules load inside the command bodies.
"""

from __future__ import annotations

import click

from edgekv import __version__
from edgekv.cli.chat import chat
from edgekv.cli.formats import formats
from edgekv.cli.generate import generate
from edgekv.cli.plan import plan
from edgekv.cli.serve import serve
from edgekv.eval.cli import eval_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekv")
def main() -> None:
    """EdgeKV: LLM inference with a paged, quantized KV cache."""


for command in (chat, serve, generate, formats, plan, eval_command):
    main.add_command(command)
