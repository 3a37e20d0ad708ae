"""A user's mistake on the command line: one line on stderr, exit code 2, no traceback.

The API raises ``ValueError`` for bad input (and the OS raises ``OSError`` for a file that
cannot be read); the commands run the code that may raise them inside ``user_errors()``,
which turns either into an ``InputError``. Click prints that as one line, ``Error: ...``,
and exits with code 2. Anything else is a bug in EdgeKV and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click


class InputError(click.ClickException):
    """Bad input: printed as one line ("Error: ..."), exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(message: str) -> str:
    """``message`` with its line breaks folded, so that the error stays one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def describe(e: BaseException) -> str:
    """What went wrong, for the user: the message, or the OS's words and the file."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn ValueError / OSError raised inside into an ``InputError`` (exit code 2)."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise InputError(describe(e)) from None
