"""``edgekv serve``: the OpenAI-compatible HTTP server (edgekv/serve/)."""

from __future__ import annotations

import click

from edgekv.cli.options import model_options, quiet_libraries


@click.command()
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
