"""Text typed or piped in by a user: UTF-8, with bytes that are not replaced, never fatal.

A stray Latin-1 byte (``caf\\xe9``) must not end a chat or a ``generate`` run: the bytes
are decoded as UTF-8 and each invalid sequence becomes U+FFFD, and the caller tells the
user how many bytes were replaced (``replaced_notice``).
"""

from __future__ import annotations

import re
import sys

_ESCAPED = re.compile("[\udc80-\udcff]")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, bytes replaced): ``data`` as UTF-8, each invalid sequence as U+FFFD."""
    escaped = data.decode("utf-8", "surrogateescape")  # one U+DC80..U+DCFF per bad byte
    return data.decode("utf-8", "replace"), len(_ESCAPED.findall(escaped))


def replaced_notice(n: int) -> str:
    return f"(input was not valid UTF-8; replaced {n} byte{'s' if n != 1 else ''})"


def read_stdin() -> tuple[str, int]:
    """(text, bytes replaced): all of stdin, read as bytes and decoded as UTF-8."""
    return decode_utf8(sys.stdin.buffer.read())


def reencode(line: str) -> tuple[str, int]:
    """(text, bytes replaced) of a line read with ``errors="surrogateescape"``: the bytes
    the decoder could not read come back as U+FFFD."""
    return decode_utf8(line.encode("utf-8", "surrogateescape"))
