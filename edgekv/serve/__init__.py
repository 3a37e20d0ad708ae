"""``edgekv serve``: an OpenAI-compatible HTTP server over the paged, quantized KV cache.

app.py holds the routes, loop.py the one thread that drives the engine for every client,
process.py that thread's process (the command runs the engine apart from the HTTP side),
protocol.py the request bodies and the error shape, metrics.py ``/metrics``, run.py the
command's body.
"""

from .app import create_app

__all__ = ["create_app"]
