"""Who may drive an engine now, and where a Ctrl-C may land in it.

One engine is driven by one thread at a time. ``hold()`` wraps every call that changes the
engine (a ``generate``, one ``next()`` of a stream, a chat turn's set-up, ``score``); a
second thread that calls while another is inside gets a RuntimeError at once instead of
corrupting state. The owning thread may nest holds (``generate`` holds, ``add`` inside it
holds again).

Ctrl-C: Python raises KeyboardInterrupt between any two bytecodes, so it could land halfway
through moving a block between two tables. While the main thread holds the engine, SIGINT
only sets a flag, and the engine raises KeyboardInterrupt at its safe points:
``checkpoint()`` (between steps) and anywhere inside ``interruptible()`` (the model run,
which a step knows how to roll back). A Ctrl-C that arrives elsewhere is raised when the
outermost hold ends. Nothing changes when another SIGINT handler is installed, or off the
main thread (signals are only delivered to the main thread).

::

    generate:  hold [ step: checkpoint  schedule  (run: interruptible)  sample ... ] ...
                      ^ a deferred Ctrl-C is raised here, or at once inside the run
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BUSY = ("this LLM is being used by another thread; create one LLM per thread or serialise "
        "calls")


class EngineGuard:
    """A non-blocking re-entrant lock plus a SIGINT deferral. ``depth`` > 0 while some
    thread is inside a hold (read from another thread it only says "busy")."""

    def __init__(self):
        self._lock = threading.RLock()
        self.depth = 0  # holds of the owning thread, nested
        self._pending = False  # a SIGINT arrived while deferred
        self._open = 0  # > 0 inside interruptible(): SIGINT raises at once
        self._previous = None  # the SIGINT handler to put back

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Own the engine for the duration; RuntimeError if another thread owns it."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(BUSY)
        try:
            install = self.depth == 0 and _can_defer()
            if install:
                self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self.depth += 1
            interrupted = False
            try:
                yield
            finally:
                self.depth -= 1
                if install:
                    signal.signal(signal.SIGINT, self._previous)
                    interrupted, self._pending = self._pending, False
            if interrupted:  # arrived at no safe point, and nothing else was raised
                raise KeyboardInterrupt
        finally:
            self._lock.release()

    def checkpoint(self) -> None:
        """A safe point: raise the Ctrl-C that arrived since the last one."""
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a Ctrl-C is raised where it lands (the caller rolls back)."""
        self.checkpoint()
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1

    def _on_sigint(self, signum, frame) -> None:
        if self._open:
            raise KeyboardInterrupt
        self._pending = True


def _can_defer() -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


__all__ = ["BUSY", "EngineGuard"]
