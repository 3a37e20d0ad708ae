"""``edgekv serve``'s body: check the address, start the engine process (it loads the
model), run uvicorn until Ctrl-C."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import click

from edgekv.cli.errors import InputError


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
    """Run the server until Ctrl-C: the engine in a process of its own (process.py), the
    HTTP side in this one. On a CPU, torch's operations get ``threads`` (default: one less
    than the CPUs) and a batch's attention every CPU (``threads`` if given): with all of
    them, torch's thread pool keeps every core busy between steps and the HTTP side waits
    for a core (measured on 2 CPUs: one client streamed 200 tok/s with 2 threads, 390 with
    1)."""
    import uvicorn

    from .app import app_for
    from .process import EngineFailed, EngineProcess

    check_address(host, port)
    # torch leaves the HTTP side a CPU; a batch's attention takes them all (cpu_jit.py)
    engine = EngineProcess(opts, {"max_num_seqs": max_num_seqs},
                           threads or max(1, cpus() - 1), threads or cpus(),
                           max_live=max_num_seqs + max_queue)
    try:
        info = engine.launch()
    except EngineFailed as e:
        raise click.ClickException(f"the engine did not start: {e}") from None
    name = served_model_name or Path(info["model_dir"]).name
    app = app_for(engine, name, api_key)
    s = info["stats"]
    auth = "API key required" if api_key else "no API key: anyone who reaches the port may use it"
    n, na = info["threads"], info["attention_threads"]
    where = (f"{n} CPU thread{'s' if n > 1 else ''}" + (f" ({na} for attention)"
                                                        if na != n else "")
             if info["device"] == "cpu" else info["device"])
    from edgekv.config import describe_kv

    kv = describe_kv(s)
    click.echo(f"edgekv serve: {name} at http://{host}:{port}/v1, KV {kv} "
               f"({s['bytes_per_token']:,} B/token, {s['blocks_total']} blocks), {where}, "
               f"{auth}. Ctrl-C stops.")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.stop()  # (the app's shutdown did, unless uvicorn never started)
