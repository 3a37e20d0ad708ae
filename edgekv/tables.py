"""Tables EdgeKV prints (``edgekv plan``, ``formats``, the chat's /stats) and writes
(``edgekv eval --markdown``), rendered by tabulate: column widths come from the contents.

Cells are shown as given (``str()``, no number parsing): the callers format their numbers.
The headers go in as the first row, so that tabulate pads no header two characters wider
than its column, and aligns each header as its column.
"""

from __future__ import annotations

from collections.abc import Sequence

Row = Sequence[object]


def _aligns(align: str, n: int) -> list[str]:
    return ["right" if a == "r" else "left" for a in align.ljust(n, "l")]


def text_table(rows: Sequence[Row | None], headers: Sequence[str] = (), align: str = "",
               indent: str = "") -> list[str]:
    """The lines of a text table: ``headers`` over a rule as long as they are, then
    ``rows`` (their cells are strings: tabulate would show None as an empty cell);
    ``align`` gives each column as "l" or "r" (left by default); a row that is ``None``
    is a blank line between groups; no trailing spaces."""
    from tabulate import tabulate  # imported when a table is printed, not at startup

    n = len(headers) if headers else max((len(r) for r in rows if r), default=0)
    cells = [[""] * n if r is None else list(r) for r in rows]
    text = tabulate([list(headers), *cells] if headers else cells, tablefmt="plain",
                    colalign=_aligns(align, n), disable_numparse=True)
    lines = [(indent + line).rstrip() for line in text.splitlines()]
    if headers:
        lines.insert(1, indent + "-" * (len(lines[0]) - len(indent)))
    return lines


def markdown_table(rows: Sequence[Row], headers: Sequence[str], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` as in ``text_table`` (the rule carries it:
    ``---:`` for a right-aligned column)."""
    from tabulate import tabulate

    # without headers, the "pipe" format rules the top of the table: the first row
    # (the headers) goes above the rule
    rule, *body = tabulate([list(headers), *map(list, rows)], tablefmt="pipe",
                           colalign=_aligns(align, len(headers)),
                           disable_numparse=True).splitlines()
    return "\n".join([body[0], rule, *body[1:]])
