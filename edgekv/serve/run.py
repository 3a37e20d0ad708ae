"""``edgekv serve``'s body: check the address, load the model, run uvicorn until Ctrl-C."""

from __future__ import annotations

import errno
import logging
import os
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


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def serve(host: str, port: int, api_key: str | None, max_num_seqs: int, max_queue: int,
          served_model_name: str | None, threads: int | None, opts: dict) -> None:
    """Run the server until Ctrl-C. On a CPU the model gets ``threads`` (default: one less
    than the CPUs): with all of them, the threads of its parallel kernels keep every core
    busy between steps and the HTTP side waits for a core (measured on 2 CPUs: one client
    streamed 200 tok/s with 2 model threads, 330 with 1)."""
    import torch
    import uvicorn

    from .app import create_app

    check_address(host, port)
    llm, _ = build(opts, max_num_seqs=max_num_seqs)
    if llm.device.type == "cpu":
        torch.set_num_threads(threads or max(1, cpus() - 1))
    name = served_model_name or llm.model_dir.name
    app = create_app(llm, name, api_key, max_live=max_num_seqs + max_queue)
    s = llm.kv_stats()
    auth = "API key required" if api_key else "no API key: anyone who reaches the port may use it"
    n = torch.get_num_threads()
    where = f"{n} CPU thread{'s' if n > 1 else ''}" if llm.device.type == "cpu" \
        else str(llm.device)
    click.echo(f"edgekv serve: {name} at http://{host}:{port}/v1, KV {s['kv_format']} "
               f"({s['bytes_per_token']:,} B/token, {s['blocks_total']} blocks), {where}, "
               f"{auth}. Ctrl-C stops.")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
