"""Byte sizes: the parser of the sizes users type, and the ways EdgeKV prints them.

One module instead of a copy per caller (no torch: the CLI imports it to parse). A library
was weighed and not used: humanfriendly's ``parse_size`` reads a unit by its first letter
("8 gigs" is 8 GB, "1 KiBB" 1000 bytes, "1e" an exabyte), where a typo here must be an
error naming the accepted units; its ``format_size`` picks the unit and the digits, where
the plan's columns keep GiB and the sizes printed into commands must parse back exactly.
"""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

# the units parse_memory accepts, lower-cased: KB/MB/GB/TB are powers of 1000,
# KiB/MiB/GiB/TiB powers of 1024, no unit (or B) is bytes
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as "512MiB", "2GiB", "1.5 GB", "4096"."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _SIZE.fullmatch(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(
                f"not a memory size: {value!r} (use a number of bytes, or a number and a "
                f"unit: KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024), "
                f"e.g. '512MiB', '8GiB')"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return n


def size_arg(n: int) -> str:
    """``n`` bytes as a command line takes them, exactly: whole MiB or KiB where they are,
    else bytes (``parse_memory(size_arg(n)) == n``)."""
    for unit, b in (("MiB", MiB), ("KiB", KiB)):
        if n % b == 0:
            return f"{n // b}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """The largest binary unit up to GiB that leaves a number under 1024, one decimal
    ("512 B", "162.5 KiB", "16.0 MiB"): the chat status line."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def gib(n: float) -> str:
    """``n`` bytes in GiB, two decimals ("1.04 GiB"): sizes compared across a table."""
    return f"{n / GiB:.2f} GiB"


def mib(n: float, decimals: int | None = None) -> str:
    """``n`` bytes in MiB: whole MiB from 1 MiB up, one decimal under it ("240 MiB",
    "0.5 MiB"), or ``decimals`` places throughout."""
    if decimals is None:
        decimals = 0 if n >= MiB or n == 0 else 1
    return f"{n / MiB:.{decimals}f} MiB"
