"""``kv_format="auto"``: what the user asked for (a budget in bits per stored value)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BITS = 5.0  # bare "auto": between int4 (4.25-5 bits) and int8 (8.1): a few layers
#                     exact or in int8 where the probe finds them sensitive, int4 elsewhere
# most bytes first; int4_g32 (5 bits) is not offered: int4_nl (4.5) has less error on every
# layer measured, so a probe of it would only cost time
CANDIDATES = ("fp16", "int8", "int4_nl", "int4")


@dataclass(frozen=True)
class AutoSpec:
    """bits: average bits per stored K/V value (scales included) the assignment may use;
    None where ``LLM(target_context=...)`` gives the budget instead."""

    bits: float | None


def parse_auto(kv_format) -> AutoSpec | None:
    """AutoSpec for "auto" or "auto:<bits>" (e.g. "auto:4.5"), None for anything else;
    ValueError (one line) for a malformed budget."""
    if not isinstance(kv_format, str) or not kv_format.startswith("auto"):
        return None
    if kv_format == "auto":
        return AutoSpec(None)
    head, _, bits = kv_format.partition(":")
    try:
        b = float(bits) if head == "auto" else float("nan")
    except ValueError:
        b = float("nan")
    if not 1.0 <= b <= 32.0:
        raise ValueError(f"kv_format {kv_format!r}: write auto, or auto:BITS with BITS the "
                         f"average bits per stored value in [1, 32], e.g. auto:5")
    return AutoSpec(b)
