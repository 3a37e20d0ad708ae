"""How a layer's attention error is spread over the ages of the tokens it reads.

A stored key or value with quantization error e_j moves a query's attention output by
about sum_j p_j * e_j (values; keys alike through the logits), errors of different tokens
independent, so the output's squared error is ~ sum_j p_j^2 * |e_j|^2: token j carries a
share ``p_j^2 / sum p^2`` of it. The KL a layer costs the model grows with that squared
error (probe.py), so a format stored for a band of ages costs its uniform KL times the
band's share. The probe's reference prefill measures, per layer, over its scored queries:

    d[a]    the mean share of the token ``a`` positions back (ages measured: up to the
            calibration length), then a power-law tail c * a^-gamma fitted on the last
            two octaves measured
    sink    the share of the first ``SINK`` positions (attention sinks: always the
            oldest tokens, so in the last tier)

At another history H (``shares``) each token keeps its weight and the shares are taken
over the H tokens read: a layer's whole error stays its probed KL (uniform formats cost
the same at every position, as edgekv eval measures them on the demo model), and the
older bands' part grows as the history does. Past the calibration length this is an
extrapolation: on the demo model, at 1-2x its 512 calibration tokens, it puts 1.0-2.2x
the KL eval measures on the old bands (conservative); plan output names its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

SINK = 4  # first positions treated as attention sinks


@dataclass(frozen=True)
class Curve:
    """Per-age values v[0 .. n-1], then c * a^-gamma."""

    values: tuple[float, ...]
    c: float
    gamma: float

    @cached_property
    def _prefix(self) -> list[float]:
        out = [0.0]
        for x in self.values:
            out.append(out[-1] + x)
        return out

    def cumulative(self, ages: float) -> float:
        """sum of v[a] over 0 <= a < ages (the tail integrated past the measured ages)."""
        n = len(self.values)
        if ages <= n:
            k = int(ages)
            return self._prefix[k] + (ages - k) * (self.values[k] if k < n else 0.0)
        lo, hi = n - 0.5, ages - 0.5  # midpoint rule: sum over a ~ integral over a +- 1/2
        if abs(self.gamma - 1.0) < 1e-9:
            tail = self.c * math.log(hi / lo)
        else:
            tail = self.c * (hi ** (1 - self.gamma) - lo ** (1 - self.gamma)) / (1 - self.gamma)
        return self._prefix[n] + tail

    @classmethod
    def fit(cls, values: list[float]) -> Curve:
        """The measured values and a tail fitted in log-log on their last two octaves
        (gamma in [0, 4]; no positive points: no tail)."""
        n = len(values)
        pts = [(math.log(a), math.log(v)) for a in range(max(n // 4, 1), n)
               if (v := values[a]) > 0]
        if len(pts) < 2:
            return cls(tuple(values), 0.0, 2.0)
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else -2.0
        gamma = min(max(-slope, 0.0), 4.0)
        return cls(tuple(values), math.exp(my + gamma * mx), gamma)

    def to_json(self) -> dict:
        return {"values": list(self.values), "c": self.c, "gamma": self.gamma}

    @classmethod
    def from_json(cls, d: dict) -> Curve:
        vals = tuple(float(x) for x in d["values"])
        if not vals or any(x < 0 or not math.isfinite(x) for x in vals):
            raise ValueError("malformed age profile")
        return cls(vals, float(d["c"]), float(d["gamma"]))


@dataclass(frozen=True)
class LayerAges:
    """One layer's error shares by age (module docstring)."""

    sink: float
    d: Curve

    def shares(self, history: int, bands: list[tuple[float, float]]) -> list[float]:
        """Share of the error of a query reading ``history`` tokens that falls in each age
        band [lo, hi) (ages count back from the query's own token, 0); the sink goes
        with the band holding the oldest age."""
        ages = max(history - SINK, 0)
        total = self.sink + self.d.cumulative(ages)
        if total <= 0:
            return [0.0] * len(bands)
        out = []
        for lo, hi in bands:
            part = self.d.cumulative(min(hi, ages)) - self.d.cumulative(min(lo, ages))
            if lo <= history - 1 < hi:
                part += self.sink
            out.append(max(part, 0.0) / total)
        return out

    def to_json(self) -> dict:
        return {"sink": self.sink, "d": self.d.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> LayerAges:
        return cls(float(d["sink"]), Curve.from_json(d["d"]))


class AgeRecorder:
    """Accumulates each layer's shares from its queries and keys in one prefill.

    ``add(layer, q, k, scale)``: q (T, Hq, D), k (T, Hkv, D), RoPE applied; the later
    half of the queries (the probe's scored positions) are measured."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerAges] = {}

    @torch.inference_mode()
    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        T, Hq, _ = q.shape
        first = T // 2
        if T - first < 1 or first <= SINK:
            return
        kk = k.float().repeat_interleave(Hq // k.shape[1], dim=1)  # (T, Hq, D)
        s = torch.einsum("qhd,khd->hqk", q[first:].float(), kk) * scale  # (Hq, nq, T)
        i = torch.arange(first, T).view(-1, 1)
        j = torch.arange(T).view(1, -1)
        s = s.masked_fill(j > i, float("-inf"))
        p2 = torch.softmax(s, dim=-1).square().sum(0).double()  # (nq, T), heads pooled
        share = p2 / p2.sum(-1, keepdim=True).clamp(min=1e-300)
        ages = T - SINK  # the oldest scored query's, outside the sink
        self.layers[layer] = LayerAges(share[:, :SINK].sum(-1).mean().item(),
                                       Curve.fit(_by_age(share, i - j, ages)))

    def result(self, num_layers: int) -> tuple[LayerAges, ...] | None:
        if sorted(self.layers) != list(range(num_layers)):
            return None
        return tuple(self.layers[i] for i in range(num_layers))


def _by_age(share: torch.Tensor, age: torch.Tensor, n: int) -> list[float]:
    """Mean share per age 0 .. n-1 over the queries that read it, the sink excluded (one
    pass of scatter-adds over the valid entries)."""
    ok = (age >= 0) & (age < n) & (age <= age[:, :1] - SINK)  # j >= SINK
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, age[ok], share[ok])
    counts = torch.zeros(n, dtype=torch.float64).index_add_(
        0, age[ok], torch.ones_like(share[ok]))
    return (sums / counts.clamp(min=1)).tolist()
