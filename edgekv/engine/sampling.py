"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def request_seed(base: int, request_id: int) -> int:
    """A request's default seed: a SplitMix64 mix of (LLM seed, request id) into 63 bits.
    Consecutive ids land far apart, so ``seed + j`` (sample j) never meets another
    request's stream in practice, and the same LLM seed replays the same streams."""
    mask = (1 << 64) - 1
    z = (base * 0x9E3779B97F4A7C15 + request_id + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1  # 63 bits: seed + j stays a valid generator seed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters. ``seed`` fixes
    this request's random stream (None: ``request_seed(llm_seed, request_id)``, a 63-bit mix,
    so the ``seed + j`` streams of neighbouring requests' samples do not coincide).
    Generation stops at EOS (unless ``ignore_eos``), at any of ``stop_token_ids``, when the
    text contains one of ``stop`` (the text is cut before it), or after ``max_tokens``.

    ``n``: samples per prompt. They fork off one prefilled prompt and share its blocks;
    sample ``j`` draws from the random stream seeded with ``seed + j`` (seed as above), so
    with a fixed seed it equals a separate ``n=1`` request with ``seed=seed + j``.
    ``logprobs`` (None: off): record each output token's log-probability under the model
    (log-softmax of its logits, before temperature and filters) and the ``logprobs`` most
    likely tokens of that step with theirs (0: the chosen token's only); they land in
    ``Sequence.logprobs``, one entry per output token.
    ``beam_width`` (None: off): beam search instead of sampling (deterministic; temperature,
    top-k, top-p and stop strings are not used). Hypotheses are ranked by cumulative log-prob
    divided by (output length) ** ``length_penalty``; beam width 1 is greedy decoding.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    beam_width: int | None = None
    length_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("n", "beam_width"):
            v = getattr(self, name)
            if (v is not None or name == "n") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in 0..20, got {self.logprobs!r}")
        if self.n > 1 and self.beam_width is not None:
            raise ValueError("beam search returns beam_width outputs: leave n at 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: list[int]
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits (N, vocab); per row (log-prob of ``tokens[i]``, the ``k[i]`` most likely
    (token, log-prob) pairs, best first), from the log-softmax of the raw logits."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    top = torch.topk(lp, max(k), dim=-1) if max(k) else None
    out = []
    for i, c in enumerate(chosen):
        alts = [] if not k[i] else list(zip(top.indices[i, : k[i]].tolist(),
                                             top.values[i, : k[i]].tolist(), strict=True))
        out.append((c, alts))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits (N, vocab) fp32 -> one token id per row, each row with its own params/stream."""
    out = []
    greedy = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        row = logits[i] / p.temperature  # (vocab,)
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, -1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        gen = generators[i]
        tok = torch.multinomial(probs.cpu(), 1, generator=gen).item()
        out.append(int(tok))
    return out
