"""``edgekv serve``: an OpenAI-compatible HTTP server over the paged, quantized KV cache.

app.py holds the routes, loop.py the one thread that drives the engine for every client,
protocol.py the request bodies and the error shape, metrics.py ``/metrics``.
"""

from .app import create_app

__all__ = ["create_app"]
