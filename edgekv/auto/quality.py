"""Predicted quality of a KV storage choice: uniform, per-layer, exact window, age tiers.

A choice stores each layer's tokens by age in bands::

    ages  0 ........ E ............ E + N1 ............ (older)
          exact      tier 0 format   tier 1 format ...   last tier's format

and the probe measured, per layer l and format f, the KL of storing all of layer l in f
(``kl[l][f]``, its fitted prediction) and how layer l's error is spread over ages
(``age[l]``, age.py). A band costs its format's KL times its share of the error::

    KL(choice, history H) = sum_l sum_bands kl[l][f_band] * share_l(band, H)

the exact band costing nothing. A uniform format is one band (share 1); a per-layer
assignment one band per layer. ``at`` is the KL per token of a query reading ``H``
tokens (the end of a context of H); ``mean`` averages over H = 1 .. W (a whole window,
as ``edgekv eval`` measures token by token).

Delta perplexity: where the text follows the model's own distribution, the mean extra
negative log-likelihood is the KL, so ppl grows by ``exp(KL) - 1``. On the demo model's
held-out text eval measured 0.3x to 1x of that (other text, other model: a guide).

A model with no weights at hand (``edgekv plan`` on a config) has no probe: ``prior``
maps the bundled demo model's measurement onto its layers (by relative depth, the total
KL per format kept). It ranks choices; its absolute numbers are the demo model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .age import LayerAges

PRIOR_FILE = Path(__file__).with_name("prior_demo.json")
EXACT = None  # a band read exact

Band = tuple[float, float, "str | None"]  # ages [lo, hi), format (None: exact)


@dataclass(frozen=True)
class QualityModel:
    """``kl[l][j]``: layer l's predicted KL with all its tokens in ``formats[j]``;
    ``age[l]``: its error shares by age; ``source``: where the numbers come from."""

    formats: tuple[str, ...]
    kl: tuple[tuple[float, ...], ...]
    age: tuple[LayerAges, ...]
    source: str
    calibration_tokens: int

    @classmethod
    def from_probe(cls, probe, source: str) -> QualityModel:
        if probe.age is None:
            raise ValueError("the probe result has no age profile: probe again")
        return cls(probe.formats, probe.predicted, probe.age, source, probe.tokens)

    @property
    def num_layers(self) -> int:
        return len(self.kl)

    def covers(self, fmt: str | None) -> bool:
        return fmt is EXACT or fmt in self.formats

    def _kl(self, layer: int, fmt: str | None) -> float:
        if fmt is EXACT:
            return 0.0
        return self.kl[layer][self.formats.index(fmt)]

    def at(self, bands: Sequence[Sequence[Band]], history: int) -> float:
        """KL per token of a query reading ``history`` tokens; ``bands[l]``: layer l's
        bands (one list for every layer if ``len(bands) == 1``)."""
        total = 0.0
        for layer in range(self.num_layers):
            mine = bands[layer if len(bands) > 1 else 0]
            parts = self.age[layer].shares(history, [(lo, hi) for lo, hi, _ in mine])
            total += sum(self._kl(layer, f) * w for (_, _, f), w in zip(mine, parts,
                                                                        strict=True))
        return total

    def mean(self, bands: Sequence[Sequence[Band]], window: int, points: int = 64) -> float:
        """Mean of ``at`` over histories 1 .. window (``points`` evenly spaced samples)."""
        hs = sorted({max(1, round(window * (i + 0.5) / points)) for i in range(points)})
        return sum(self.at(bands, h) for h in hs) / len(hs)

    def to_json(self) -> dict:
        return {"formats": list(self.formats), "kl": [list(r) for r in self.kl],
                "age": [a.to_json() for a in self.age], "source": self.source,
                "calibration_tokens": self.calibration_tokens}

    @classmethod
    def from_json(cls, d: dict) -> QualityModel:
        return cls(tuple(d["formats"]), tuple(tuple(float(x) for x in r) for r in d["kl"]),
                   tuple(LayerAges.from_json(a) for a in d["age"]), str(d["source"]),
                   int(d["calibration_tokens"]))


def prior(num_layers: int) -> QualityModel:
    """The demo model's measurement (PRIOR_FILE) mapped onto ``num_layers`` layers: layer
    l takes the demo layer at the same relative depth, its KL scaled so that each
    format's total over the layers stays the demo model's."""
    demo = QualityModel.from_json(json.loads(PRIOR_FILE.read_text()))
    n = demo.num_layers
    src = [min(n - 1, round(i * (n - 1) / max(num_layers - 1, 1))) for i in range(num_layers)]
    totals = [sum(r[j] for r in demo.kl) for j in range(len(demo.formats))]
    mapped = [[demo.kl[s][j] for j in range(len(demo.formats))] for s in src]
    for j, t in enumerate(totals):
        m = sum(r[j] for r in mapped)
        for r in mapped:
            r[j] = r[j] * t / m if m else 0.0
    return QualityModel(demo.formats, tuple(tuple(r) for r in mapped),
                        tuple(demo.age[s] for s in src),
                        f"prior: the bundled demo model's probe ({n} layers, "
                        f"{demo.calibration_tokens} tokens)", demo.calibration_tokens)


def measure_demo() -> QualityModel:
    """The demo model's quality model, probed on CPU as ``kv_format="auto"`` does (what
    PRIOR_FILE holds: scripts/make_quality_prior.py writes it, a test re-measures it)."""
    from edgekv import LLM

    llm = LLM(kv_format="auto", kv_memory="16MiB", device="cpu")
    return QualityModel.from_probe(llm.kv_probe, "the bundled demo model")


def uniform_bands(fmt: str, exact: int = 0) -> list[Band]:
    """One format, the newest ``exact`` tokens read exact (exact_window)."""
    return [(0, exact, EXACT), (exact, math.inf, fmt)] if exact else [(0, math.inf, fmt)]


def tier_bands(exact: int, formats: Sequence[str], tokens: Sequence[int],
               block_size: int) -> list[Band]:
    """Age tiers: the exact window, then each stored tier. A block stays in a tier until
    its newest token leaves it, so a tier reaches half a block further on average."""
    out: list[Band] = [(0, exact, EXACT)] if exact else []
    lo = exact
    reach = 0
    for f, n in zip(formats, [*tokens, None], strict=True):
        if n is None:
            out.append((lo, math.inf, f))
            break
        reach += n
        hi = max(reach + block_size / 2, lo)
        out.append((lo, hi, f))
        lo = hi
    return out


def delta_ppl(kl: float) -> float:
    """Predicted relative perplexity change (module docstring): exp(KL) - 1."""
    return math.expm1(kl)
