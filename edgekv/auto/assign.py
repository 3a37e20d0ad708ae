"""The per-layer assignment: one format per layer, least predicted KL within a byte budget.

A multiple-choice knapsack, solved exactly: layer by layer, keep every reachable total of
bytes per token with the least predicted KL that reaches it (Pareto front: a state that
costs more bytes and no less KL is dropped). Layers x formats is small (<= 128 x 8) and
the front stays short, so this is milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgekv.config import join_formats

from .probe import ProbeResult


@dataclass(frozen=True)
class Assignment:
    """The chosen format of each layer, what it costs and what the probe predicts."""

    formats: tuple[str, ...]
    bytes_per_token: int  # K+V, all layers, scales included
    budget: int  # bytes per token it had to fit in
    predicted_kl: float  # nats per token, sum of the layers' predicted kl (probe.py)
    predicted_err: tuple[float, ...]  # each layer's probed attention-output error

    @property
    def kv_format(self) -> str:
        return join_formats(self.formats)

    def summary(self, values_per_token: int) -> str:
        """One line: the formats by layer, bits per value, predicted KL."""
        counts: dict[str, list[int]] = {}
        for i, f in enumerate(self.formats):
            counts.setdefault(f, []).append(i)
        parts = ", ".join(f"{f} x{len(ls)} ({_ranges(ls)})" for f, ls in counts.items())
        bits = 8 * self.bytes_per_token / values_per_token
        return (f"kv_format=auto: {parts}; {bits:.2f} bits/value "
                f"({self.bytes_per_token} of {self.budget} B/token), predicted KL "
                f"{self.predicted_kl:.2e}")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "layers 0-2, 5"."""
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(out)


class BudgetTooSmall(ValueError):
    """Not even the cheapest format in every layer fits the budget."""


def check_budget(formats: Sequence[str], layer_bytes: Sequence[int], num_layers: int,
                 budget: int, values: int | None = None) -> None:
    """BudgetTooSmall (one line) where not even the cheapest format in every layer fits;
    ``values``: K/V values per token, to say the cheapest in bits per value too."""
    cheapest = num_layers * min(layer_bytes)
    if budget < cheapest:
        name = formats[list(layer_bytes).index(min(layer_bytes))]
        bits = f" = {8 * cheapest / values:.2f} bits/value" if values else ""
        raise BudgetTooSmall(f"a KV budget of {budget} B/token is below the cheapest "
                             f"assignment ({cheapest} B/token{bits}, every layer {name})")


def choose(probe: ProbeResult, layer_bytes: Sequence[int], budget: int) -> Assignment:
    """Least sum of ``probe.predicted[l][f]`` with sum of ``layer_bytes[f]`` <= ``budget``.

    layer_bytes[f]: one layer's K+V bytes per token in format ``probe.formats[f]``.
    Raises ValueError (one line) when even the cheapest format in every layer exceeds it.
    Ties go to fewer bytes, then to the earlier format in ``probe.formats``."""
    check_budget(probe.formats, layer_bytes, len(probe.kl), budget)
    front: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}  # bytes -> (kl, picks)
    for row in probe.predicted:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for b, (kl, picks) in front.items():
            for j, (cost, d) in enumerate(zip(layer_bytes, row, strict=True)):
                nb, nk = b + cost, kl + d
                if nb > budget:
                    continue
                if nb not in nxt or nk < nxt[nb][0]:
                    nxt[nb] = (nk, picks + (j,))
        best, front = float("inf"), {}
        for b in sorted(nxt):  # keep a state only if it beats every cheaper one
            if nxt[b][0] < best:
                best, front[b] = nxt[b][0], nxt[b]
    b = min(front, key=lambda x: (front[x][0], x))
    kl, picks = front[b]
    return Assignment(tuple(probe.formats[j] for j in picks), b, budget, kl,
                      tuple(probe.err[layer][j] for layer, j in enumerate(picks)))
