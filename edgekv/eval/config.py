"""EvalConfig: what one `edgekv eval` run measures, validated once, never mutated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekv.quant import FORMATS, VARIANTS, get_format

BASELINE = "fp16"  # every metric is measured against the fp16 cache on the same tokens
PEERS = ("hf", "quanto-int4", "quanto-int2", "hqq-int4", "hqq-int2")  # see peers.py


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. Lengths are in tokens; None fields are derived from the model.

    formats:        KV formats to compare (``edgekv.quant`` FORMATS or VARIANTS); the fp16
                    baseline is always measured and comes first
    eviction:       eviction policies (``edgekv.llm.EVICTION_POLICIES``); each is measured
                    for every format and every budget over the decode windows
    eviction_chunk: tokens per step through the budget: 1 = token by token, as decode
                    reads the cache; more = the window streamed as a long prompt prefilled
                    in chunks, eviction between them (the prefill-time selection)
    budgets:        per-sequence KV budgets: a value <= 1 is a fraction of ``window``,
                    a larger one a token count
    text:           a text file (.txt), or a dataset file (.jsonl / .json / .csv with a
                    "text" field); None: the bundled demo model's held-out text
    window, stride: perplexity windows (None: the model's context, capped at 1024;
                    stride None: equal to window, i.e. non-overlapping)
    max_windows:    use only the first N perplexity windows (None: all that fit)
    decode_windows: the first N windows are also scored token by token, each token reading
                    its history from the cache as decode does: KL, top-1, decode perplexity
    exact_window:   exact windows (``LLM(exact_window=R)``: the newest R tokens read
                    unquantized) to measure each quantized format with; 0 = none
    tiers:          age-tier specs (``LLM(kv_tiers=...)``), each measured as one more row
                    (token by token: a prefill does not demote until it ends)
    prompts, prompt_len, gen_len: greedy continuations compared with fp16's
    layer_tokens:   tokens of the first window used for the per-layer attention error
    peers:          "auto" (those installed), "none", or names from PEERS
    peer_residual:  ``residual_length`` of transformers' quantized caches: the newest
                    tokens they keep unquantized (None: transformers' default, 128; 0:
                    everything quantized, as in EdgeKV)
    passkey:        run the passkey test when the model's context is at least
                    ``passkey_min_context``; ``passkey_lengths`` overrides the lengths
    dtype:          weights and activations (fp32 so the harness check against
                    transformers is exact up to the cache format)
    """

    model: str | None = None
    formats: tuple[str, ...] = ("fp16", "int8", "int4")
    eviction: tuple[str, ...] = ()
    budgets: tuple[float, ...] = (0.125, 0.25, 0.5)
    eviction_chunk: int = 1
    exact_window: tuple[int, ...] = (0,)
    tiers: tuple[str, ...] = ()
    text: str | None = None
    window: int | None = None
    stride: int | None = None
    max_windows: int | None = None
    decode_windows: int = 2
    prompts: int = 8
    prompt_len: int = 128
    gen_len: int = 32
    layer_tokens: int = 512
    peers: str | tuple[str, ...] = "auto"
    peer_residual: int | None = None
    passkey: bool = True
    passkey_min_context: int = 2048
    passkey_lengths: tuple[int, ...] = ()
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 2
    dtype: str = "float32"
    device: str | None = None
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("give at least one KV format")
        from edgekv.auto import parse_auto

        for f in self.formats:
            if f not in FORMATS + VARIANTS and parse_auto(f) is None:
                get_format(f)  # raises the one-line error listing the valid names
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats are listed twice: {', '.join(self.formats)}")
        from edgekv.llm import EVICTION_POLICIES

        for p in self.eviction:
            if p not in EVICTION_POLICIES:
                valid = ", ".join(EVICTION_POLICIES) or "none available in this install"
                raise ValueError(f"unknown eviction policy {p!r}; valid: {valid}")
        if self.eviction and not self.budgets:
            raise ValueError("eviction needs at least one budget (--budgets)")
        for b in self.budgets:
            if not b > 0 or (b > 1 and b != int(b)):
                raise ValueError(f"a budget is a fraction in (0, 1] of the window or a whole "
                                 f"number of tokens, got {b}")
        if self.text is not None:
            _check_readable(self.text)
        for name in ("window", "stride", "max_windows"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed the window "
                             f"({self.window})")
        if self.peer_residual is not None and self.peer_residual < 0:
            raise ValueError(f"peer_residual must be >= 0, got {self.peer_residual}")
        if not self.exact_window or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in self.exact_window):
            raise ValueError(f"exact_window takes token counts >= 0, got {self.exact_window!r}")
        from edgekv.tiers import parse_tiers

        for spec in self.tiers:
            parse_tiers(spec)
        if self.tiers and self.decode_windows == 0:
            raise ValueError("tiers are measured over the decode windows: give "
                             "decode_windows >= 1")
        if not isinstance(self.eviction_chunk, int) or self.eviction_chunk < 1:
            raise ValueError(f"eviction_chunk must be a positive integer, got "
                             f"{self.eviction_chunk!r}")
        for name in ("decode_windows", "prompts", "gen_len", "layer_tokens", "passkey_trials"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.eviction and self.decode_windows == 0:
            raise ValueError("eviction is measured over the decode windows: give "
                             "decode_windows >= 1")
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be positive, got {self.prompt_len}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1
               for n in self.passkey_lengths):
            raise ValueError(f"passkey lengths are positive token counts, got "
                             f"{self.passkey_lengths!r}")
        if isinstance(self.peers, str) and self.peers not in ("auto", "none"):
            raise ValueError(f"peers must be 'auto', 'none' or a list of {', '.join(PEERS)}")
        if not isinstance(self.peers, str):
            for p in self.peers:
                if p not in PEERS:
                    raise ValueError(f"unknown peer {p!r}; valid: {', '.join(PEERS)}")
        from edgekv.device import resolve_device
        from edgekv.models.loader import resolve_dtype

        resolve_dtype(self.dtype, None)  # a bad name raises the one-line error now
        resolve_device(self.device)  # so does CUDA on a machine without it
        if any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError("passkey depths are fractions in [0, 1]")

    def exact_windows(self, fmt: str) -> tuple[int, ...]:
        """The exact windows ``fmt`` is measured with (unquantized formats: 0 only)."""
        if fmt in ("fp16", "bf16", "fp32"):
            return (0,)
        return tuple(dict.fromkeys(self.exact_window))

    @property
    def measured_formats(self) -> tuple[str, ...]:
        """The baseline first, then the requested formats in their order."""
        return (BASELINE,) + tuple(f for f in self.formats if f != BASELINE)

    def budget_tokens(self, window: int) -> list[int]:
        """Budgets in tokens for a window of ``window`` tokens (fractions rounded)."""
        return [int(b) if b > 1 else max(1, round(b * window)) for b in self.budgets]


def _check_readable(path: str) -> None:
    """A ValueError unless ``path`` is a file this process can open."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file not found: {path}" if not p.exists() else
                         f"text file {path} is not a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read the text file {path}: {e.strerror or e}") from None
