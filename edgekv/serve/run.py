"""``edgekv serve``'s body: check the address, load the model, run uvicorn until Ctrl-C."""

from __future__ import annotations

import errno
import logging
import socket

import click

from edgekv.cli import build
from edgekv.cli_errors import InputError


def check_address(host: str, port: int) -> None:
    """A one-line error, before the model loads, when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise InputError(f"{host}:{port} {why}: pick another --port") from None


def serve(host: str, port: int, api_key: str | None, max_num_seqs: int, max_queue: int,
          served_model_name: str | None, opts: dict) -> None:
    import uvicorn

    from .app import create_app

    check_address(host, port)
    llm, _ = build(opts, max_num_seqs=max_num_seqs)
    name = served_model_name or llm.model_dir.name
    app = create_app(llm, name, api_key, max_live=max_num_seqs + max_queue)
    s = llm.kv_stats()
    auth = "API key required" if api_key else "no API key: anyone who reaches the port may use it"
    click.echo(f"edgekv serve: {name} at http://{host}:{port}/v1, KV {s['kv_format']} "
               f"({s['bytes_per_token']:,} B/token, {s['blocks_total']} blocks), {auth}. "
               f"Ctrl-C stops.")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
