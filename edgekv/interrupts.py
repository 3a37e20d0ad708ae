"""Holding Ctrl-C back while a few state changes commit together.

Python raises KeyboardInterrupt between any two bytecodes, so a commit made of several
assignments (one per layer's storage, then the block table) could be cut in half. Inside
``deferred_interrupts()`` a SIGINT is recorded instead, and raised as KeyboardInterrupt when
the block ends, after the commit is whole. Only the main thread receives signals; in any
other thread the block runs as it is.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def deferred_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is not signal.SIG_IGN:
        if callable(previous):  # Python's default handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
        else:
            raise KeyboardInterrupt
