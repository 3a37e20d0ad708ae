"""Accuracy metrics: pure functions over logits and token ids.

Each function returns sums and counts rather than means, so windows of different sizes
combine exactly: ``Tally`` adds them up and turns them into the reported numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets``.

    logits: (T, vocab) fp32; targets: (T,) int64. Computed in fp64 so the sum of tens
    of thousands of tokens does not depend on summation order.
    """
    return F.cross_entropy(logits.double(), targets, reduction="sum").item()


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of KL(ref || other) in nats, number of tokens whose argmax agrees).

    ref_logits, logits: (T, vocab) fp32, next-token logits for the same tokens.
    """
    ref = F.log_softmax(ref_logits.double(), dim=-1)  # (T, V)
    other = F.log_softmax(logits.double(), dim=-1)  # (T, V)
    kl = (ref.exp() * (ref - other)).sum(dim=-1).clamp(min=0)  # (T,)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    return kl.sum().item(), int(top1)


def tokens_until_divergence(ref: list[int], other: list[int]) -> int:
    """Length of the common prefix of two continuations."""
    n = 0
    for a, b in zip(ref, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    """||other - ref|| / ||ref|| (Frobenius, fp64); 0 when both are zero."""
    ref, other = ref.double(), other.double()
    denom = ref.norm().item()
    diff = (other - ref).norm().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


@dataclass
class Tally:
    """Running sums of one configuration's metrics over windows and prompts."""

    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    top1: int = 0
    kl_tokens: int = 0
    matched: list[int] = field(default_factory=list)  # per prompt: tokens before divergence
    full: int = 0  # prompts whose whole continuation matched

    def add_nll(self, nll: float, count: int) -> None:
        self.nll += nll
        self.tokens += count

    def add_kl(self, kl: float, top1: int, count: int) -> None:
        self.kl += kl
        self.top1 += top1
        self.kl_tokens += count

    def add_continuation(self, ref: list[int], other: list[int]) -> None:
        n = tokens_until_divergence(ref, other)
        self.matched.append(n)
        self.full += int(n == len(ref))

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None

    @property
    def mean_kl(self) -> float | None:
        return self.kl / self.kl_tokens if self.kl_tokens else None

    @property
    def top1_rate(self) -> float | None:
        return self.top1 / self.kl_tokens if self.kl_tokens else None

    @property
    def mean_matched(self) -> float | None:
        return sum(self.matched) / len(self.matched) if self.matched else None

    @property
    def full_rate(self) -> float | None:
        return self.full / len(self.matched) if self.matched else None


def delta_pct(value: float | None, base: float | None) -> float | None:
    """100 * (value / base - 1), or None when either is missing."""
    if value is None or base is None:
        return None
    return 100.0 * (value / base - 1.0)
