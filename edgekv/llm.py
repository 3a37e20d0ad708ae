"""The Python API: ``LLM`` and what ``generate`` returns."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from edgekv.auto import parse_auto
from edgekv.cache.exact_window import check_exact_window
from edgekv.cache.memory import auto_kv_plan
from edgekv.config import CacheConfig, format_names, join_formats
from edgekv.device import resolve_device
from edgekv.engine.engine import Engine
from edgekv.engine.outputs import RequestOutput, request_done, request_output
from edgekv.engine.sampling import SamplingParams
from edgekv.engine.scoring import score
from edgekv.engine.sequence import Sequence
from edgekv.eviction import EVICTION_POLICIES, EvictionConfig
from edgekv.kernels import get_backend
from edgekv.models import load_model
from edgekv.models.loader import resolve_dtype
from edgekv.names import renamed
from edgekv.tiers import parse_tiers
from edgekv.units import gib, parse_memory

log = logging.getLogger("edgekv")

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"  # package data, see its README.md


class LLM:
    """A model over a paged, quantized KV cache.

    ``model``: a local HF-format directory or a hub id. ``kv_format``: how K/V are stored
    (``edgekv.quant.FORMATS``). ``kv_memory``: the KV pool's size in bytes or as "512MiB";
    None or "auto" sizes it from free memory (``edgekv.cache.memory``; ``llm.kv_plan`` says what was
    chosen, and "auto" logs it at INFO). ``weights``: None, "int8" or "nf4" (bitsandbytes).
    ``dtype``: torch dtype or its name; None keeps the checkpoint's, except on a CPU, where
    fp16 checkpoints compute in fp32 (``edgekv.models.loader.cpu_compute_dtype``);
    ``llm.compute_dtype`` says which was chosen.
    ``eviction``: None (a sequence that outgrows the pool is preempted, or cut short when
    alone), a policy name (``EVICTION_POLICIES``) or an ``EvictionConfig`` (sinks, window);
    ``max_kv_tokens``: the tokens one sequence may keep cached (default: the whole pool).
    ``prefix_caching`` (default on): requests reuse the cached blocks of a matching prompt
    prefix (system prompts, few-shot headers); ``kv_stats()`` reports the hits.
    ``offload_memory``: bytes or "1GiB" of host memory for KV blocks swapped out of the
    device pool when it runs short (pinned on CUDA); 0 (default): off, preempted
    sequences are recomputed instead.
    ``exact_window``: the newest N tokens of each sequence are also kept in fp16 and
    attention reads them exact (``edgekv/cache/exact_window.py``); they cost N x the fp16 bytes per
    token per running sequence, on top of ``kv_memory``. 0 (default): off. For quantized
    formats; not with eviction.
    ``kv_format`` may also name one format per layer (a list, or "int8,int4,int4,int4"),
    or be "auto" / "auto:BITS": one format per layer chosen at load within BITS average bits
    per stored value (default 5; or ``kv_memory / target_context`` bytes per token), by a
    probe of what each layer's format costs the model on ``kv_calibration`` (a text file or
    token ids; default the model's heldout.txt, else the demo model's). The probe runs
    once per model and is kept in the user's cache directory; ``llm.kv_auto`` says what was
    chosen and its predicted KL (``edgekv/auto``). ``target_context``: tokens ``kv_memory``
    must hold (ValueError where it cannot); with ``kv_format="auto"`` the budget controller
    (``edgekv/plan/controller.py``) picks the storage with the least predicted KL that holds
    it: one format, one per layer, or age tiers (``llm.kv_decision`` says which, with the
    other candidates; tiers only where eviction, offload and exact_window are not given).
    ``kv_tiers``: age tiers instead of one format, e.g. "fp16:128,int8:2048,int4": each
    sequence's newest 128 tokens also exact, the next 2,048 in int8 blocks, older ones in
    int4 blocks, demoted from their codes as they age (``edgekv/tiers``); pools per tier
    out of the one ``kv_memory``. Sets the format and the exact window (leave
    ``kv_format`` and ``exact_window`` out); not yet with eviction or offload.

    Threads: one LLM is driven by one thread at a time. ``generate``, ``score``, each
    ``next()`` of a ``stream`` and each step of a chat turn hold the engine; a call from a
    second thread while another is inside raises RuntimeError at once (create one LLM per
    thread, or serialise the calls). A stream holds the engine only inside ``next()``, not
    between the pieces it yields. Exceptions: whatever a call raises (a bad prompt, an
    error, Ctrl-C wherever it lands), the engine is left consistent
    (``check_integrity()``), the request of that call is aborted, and other live requests
    (an unfinished stream, a chat) carry on as if nothing had happened.
    """

    def __init__(self, model: str | Path | None = None, kv_format: str = "int8",
                 kv_memory: int | str | None = None, block_size: int = 16,
                 eviction: str | EvictionConfig | None = None,
                 max_kv_tokens: int | None = None, weights: str | None = None,
                 device: str | torch.device | None = None, dtype=None, seed: int = 0,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 prefix_caching: bool = True, offload_memory: int | str = 0,
                 exact_window: int = 0, target_context: int | None = None,
                 kv_calibration: str | Path | Seq[int] | None = None,
                 kv_tiers: str | None = None, kv_residual: int | None = None):
        if kv_residual is not None:  # the old name of exact_window
            warnings.warn("LLM(kv_residual=) is now LLM(exact_window=)", FutureWarning,
                          stacklevel=2)
            exact_window = renamed(exact_window, kv_residual, "exact_window", "kv_residual", 0)
        device = resolve_device(device)  # fail fast on bad input, before loading anything
        tiers = None
        if kv_tiers is not None:
            tiers = parse_tiers(kv_tiers)
            kv_format, exact_window = _check_tiers(tiers, kv_format, exact_window, eviction,
                                                  offload_memory)
        auto = parse_auto(kv_format)
        if auto is None:
            kv_format = join_formats(format_names(kv_format))
        eviction = _eviction_config(eviction, max_kv_tokens)
        _check_target(target_context, kv_memory)
        if auto is None:
            check_exact_window(exact_window, kv_format, eviction)
        if model is None:
            model = DEMO_MODEL_DIR
            if not (model / "config.json").is_file():
                raise ValueError(f"the bundled demo model is missing from {model}; pass "
                                 f"model=PATH, or train it: scripts/train_demo_model.py")
        self.device = device
        self.model, self.model_config, self.model_dir = load_model(model, self.device, dtype,
                                                                   weights)
        self.compute_dtype = resolve_dtype(dtype, self.model_config, self.device)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.chat_stop = _chat_stop_strings(self.model_dir)
        mc = self.model_config
        self.last_finish_reason = None  # why the last finished stream() stopped
        self.kv_plan = None  # what kv_memory=None / "auto" chose (edgekv.cache.memory.KVPlan)
        self.kv_auto = None  # what kv_format="auto" chose (edgekv.auto.Assignment)
        chunk = max_num_batched_tokens or (2048 if self.device.type == "cuda" else 512)
        if auto is not None and target_context is not None and \
                target_context > mc.max_position:  # the controller plans one sequence of it
            raise ValueError(f"target_context={target_context} is beyond the model's context "
                             f"of {mc.max_position} tokens")
        self.kv_decision = None  # what kv_format="auto" + target_context chose (plan.Decision)
        if auto is not None:
            kv_format = self._resolve_auto(auto, kv_memory, target_context, kv_calibration,
                                           block_size)
            if target_context is not None and auto.bits is None:
                allow = eviction is None and not offload_memory and not exact_window and \
                    get_backend() != "triton"
                kv_format, tiers = self._decide_target(kv_memory, target_context, block_size,
                                                       chunk, allow, quantized=exact_window > 0)
                if tiers is not None:
                    kv_format, exact_window = _check_tiers(tiers, kv_format, exact_window,
                                                          eviction, offload_memory)
            check_exact_window(exact_window, kv_format, eviction)
        if kv_memory is None or kv_memory == "auto":
            self.kv_plan = auto_kv_plan(self.device, mc, kv_format, block_size, max_num_seqs,
                                        max_num_batched_tokens, weights)
            log.log(logging.INFO if kv_memory == "auto" else logging.DEBUG, "%s",
                    self.kv_plan.summary())
            budget = self.kv_plan.kv_bytes
            if exact_window:  # the rings come out of the same free memory
                ring = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2 * exact_window
                reserve = min(budget // 2, max_num_seqs * ring)
                log.info("exact_window=%d: %s of the KV budget kept for the rings",
                         exact_window, gib(reserve))
                budget -= reserve
        elif self.kv_decision is not None:  # the pools chosen for target_context
            budget = self.kv_decision.choice.kv_memory
        else:
            budget = parse_memory(kv_memory)
        if tiers is not None:
            self.cache_config = CacheConfig.for_tiers(budget, mc.num_layers, mc.num_kv_heads,
                                                      mc.head_dim, tiers, block_size, chunk)
        else:
            self.cache_config = CacheConfig.for_budget(budget, mc.num_layers, mc.num_kv_heads,
                                                       mc.head_dim, block_size, kv_format)
        if target_context is not None and self.cache_config.num_blocks * block_size < \
                target_context:
            raise ValueError(f"kv_memory={kv_memory!r} holds "
                             f"{self.cache_config.num_blocks * block_size} tokens in "
                             f"{self.cache_config.kv_format}, fewer than target_context="
                             f"{target_context}: give more memory, kv_format='auto', or "
                             f"eviction")
        host_blocks = 0
        if offload_memory:
            host_blocks = parse_memory(offload_memory) // self.cache_config.bytes_per_block
            if host_blocks == 0:
                raise ValueError(f"offload_memory={offload_memory!r} holds no KV block "
                                 f"({self.cache_config.bytes_per_block} bytes each)")
        self.engine = Engine(self.model, mc, self.cache_config, self.tokenizer, self.device,
                             seed=seed, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=chunk,
                             eviction=eviction, prefix_caching=prefix_caching,
                             num_host_blocks=host_blocks, exact_window_tokens=exact_window)

    def _resolve_auto(self, auto, kv_memory, target_context, calibration, block_size) -> str:
        """kv_format="auto": probe (or read the stored probe), choose, log one line."""
        from edgekv.auto import BudgetTooSmall, calibration_ids, resolve_auto
        from edgekv.auto.resolve import checkpoint_key

        mc = self.model_config
        budget = None
        target = target_context is not None and auto.bits is None
        if target:  # whole blocks: a sequence of target_context tokens fills the last one
            budget = parse_memory(kv_memory) // (-(-target_context // block_size) * block_size)
        ids = calibration_ids(self.tokenizer, self.model_dir, calibration, mc.max_position,
                              self.device.type)
        try:
            self.kv_auto, self.kv_probe = resolve_auto(
                self.model, mc, checkpoint_key(Path(self.model_dir)), ids, auto,
                device=self.device, compute_dtype=self.compute_dtype, block_size=block_size,
                budget_bytes=budget)
        except BudgetTooSmall as e:
            if budget is None:
                raise
            raise ValueError(f"kv_memory={kv_memory!r} cannot hold target_context="
                             f"{target_context} tokens in any per-layer formats ({budget} "
                             f"B/token; {e}): give more memory, or use eviction") from None
        if not target:  # else the budget controller logs its choice
            log.info("%s", self.kv_auto.summary(2 * mc.num_layers * mc.num_kv_heads *
                                                mc.head_dim))
        return self.kv_auto.kv_format

    def _decide_target(self, kv_memory, target_context, block_size, chunk,
                       allow_tiers, quantized) -> tuple[str, object]:
        """kv_format="auto" with target_context: the budget controller's choice among
        uniform, per-layer and tiered storage (edgekv/plan/controller.py), scored by the
        probe (``quantized``: no uniform fp16, for exact_window). Returns (kv_format,
        TierSpec or None); logs one line."""
        from edgekv.auto.resolve import decide_target

        d = decide_target(self.kv_probe, self.model_config, parse_memory(kv_memory),
                          target_context, block_size, chunk, allow_tiers, quantized)
        self.kv_decision = d
        c = d.choice
        log.info("%s", c.summary(target_context, d.source))
        if c.kind == "tiers":
            self.kv_auto = None  # not a per-layer assignment
            return "int8", parse_tiers(c.kv_format)
        return c.kv_format, None

    # ---- prompts -----------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _sequences(self, prompts, params: SamplingParams | None) -> list[Sequence]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        seqs = [self.engine.new_sequence(self.encode(p), params) for p in prompts]
        return seqs

    # ---- generation --------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order, each with its
        ``n`` samples or ``beam_width`` beams in ``.outputs``."""
        engine = self.engine
        with engine.hold():
            seqs = self._sequences(prompts, params)
            for s in seqs:  # every prompt, before any is queued
                engine.validate(s.token_ids, s.params)
            try:
                for s in seqs:
                    engine.add(s)
                while not all(request_done(s) for s in seqs):
                    engine.step()
            finally:
                for s in seqs:
                    if not request_done(s):
                        engine.abort(s)
            return [request_output(s) for s in seqs]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield the completion's text as it is produced (whole characters only). Closing
        or dropping the generator stops the request (at the latest, at the next call).
        When it ends, ``llm.last_finish_reason`` says why (see CompletionOutput)."""
        with self.engine.hold():
            (seq,) = self._sequences(prompt, params)
            if seq.params.n > 1 or seq.params.beam_width is not None:
                raise ValueError("stream takes n=1 and no beam_width: use generate")
            self.engine.validate(seq.token_ids, seq.params)
        yield from self.engine.drive(seq)
        self.last_finish_reason = seq.finish_reason

    def chat(self, system: str | None = None):
        """A conversation whose history stays in the KV cache between turns."""
        from edgekv.chat import ChatSession

        return ChatSession(self, system)

    def score(self, prompt: str | list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits (T, vocab) for every position of ``prompt``,
        read through the KV cache (``chunk_size=1``: exactly as decode reads it). With eviction,
        any length: the cache keeps its budget and shifts its positions."""
        ids = self.encode(prompt)
        limit = self.model_config.max_position if self.engine.evictor is None else None
        if not ids or (limit is not None and len(ids) > limit):  # eviction: any length
            raise ValueError(f"score needs 1..{limit} tokens, got {len(ids)}")
        with self.engine.hold():
            return score(self.engine, ids, chunk_size)

    def warm_up(self) -> None:
        """Run the step kinds once (a prefill, one sequence decoding, two at once) so that
        the kernels they compile or load are ready before the first request: a server's
        first batch otherwise waits ~0.4 s for the batched decode kernel. Prompts shorter
        than a block leave nothing in the prefix cache; the counters and the next request
        id (default seeds derive from it) are put back."""
        sch, eng = self.engine.scheduler, self.engine
        counters = (sch.num_preemptions, sch.prefix_query_tokens, sch.prefix_hit_tokens,
                    eng._next_id)  # request ids: the default seeds stay as without it
        n = max(1, min(self.cache_config.block_size - 4, self.model_config.max_position - 3))
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        vocab = self.model_config.vocab_size
        self.generate([[i % vocab for i in range(1, n + 1)]], params)
        self.generate([[i % vocab for i in range(2, n + 2)],
                       [i % vocab for i in range(3, n + 3)]], params)
        (sch.num_preemptions, sch.prefix_query_tokens, sch.prefix_hit_tokens,
         eng._next_id) = counters

    def check_integrity(self) -> None:
        """Assert that the engine is consistent (``Engine.check_integrity``)."""
        with self.engine.hold():
            self.engine.check_integrity()

    def kv_stats(self) -> dict:
        """What the KV cache costs now: blocks_total, blocks_used, bytes_used,
        bytes_per_token, live_tokens, utilization, preemptions, ..."""
        return self.engine.kv_stats()


def _check_target(target_context, kv_memory) -> None:
    if target_context is None:
        return
    if isinstance(target_context, bool) or not isinstance(target_context, int) or \
            target_context < 1:
        raise ValueError(f"target_context must be a number of tokens >= 1, got "
                         f"{target_context!r}")
    if kv_memory is None or kv_memory == "auto":
        raise ValueError("target_context needs kv_memory: the bytes to hold it in")


def _check_tiers(tiers, kv_format, exact_window, eviction, offload_memory) -> tuple[str, int]:
    """kv_tiers sets the format new tokens are written in and the exact window: kv_format
    and exact_window may only repeat them. Returns (kv_format, exact_window)."""
    if kv_format not in ("int8", tiers.formats[0]):
        raise ValueError(f"kv_tiers sets the formats ({tiers}): leave kv_format out")
    if exact_window not in (0, tiers.exact):
        raise ValueError(f"kv_tiers sets the exact window ({tiers}): leave exact_window out, "
                         f"or write it as the first tier, fp16:{exact_window}")
    if eviction is not None or offload_memory:
        raise ValueError("kv_tiers cannot be combined with eviction or offload yet")
    if tiers.exact and get_backend() == "triton":
        raise ValueError("kv_tiers with an exact window needs the torch prefill path, which "
                         "the forced 'triton' attention backend forbids")
    return tiers.formats[0], tiers.exact


def _eviction_config(eviction, max_kv_tokens: int | None) -> EvictionConfig | None:
    if isinstance(eviction, EvictionConfig):
        if max_kv_tokens is not None and max_kv_tokens != eviction.max_kv_tokens:
            raise ValueError("give max_kv_tokens either in the EvictionConfig or as an "
                             "argument, not both")
        return eviction
    if eviction is None:
        if max_kv_tokens is not None:
            raise ValueError("max_kv_tokens needs an eviction policy to keep sequences "
                             f"inside it: eviction= one of {', '.join(EVICTION_POLICIES)}")
        return None
    if not isinstance(eviction, str):
        raise ValueError(f"eviction must be None, a policy name or an EvictionConfig, "
                         f"got {type(eviction).__name__}")
    return EvictionConfig(eviction, max_kv_tokens=max_kv_tokens)


def _chat_stop_strings(model_dir: Path) -> tuple[str, ...]:
    """``stop_strings`` of generation_config.json: where a chat turn ends (may be empty)."""
    f = model_dir / "generation_config.json"
    if not f.is_file():
        return ()
    try:
        stop = json.loads(f.read_text(encoding="utf-8")).get("stop_strings") or ()
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not an object
        raise ValueError(f"cannot read {f}: {type(e).__name__}: {e}") from None
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _load_tokenizer(model_dir: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # a damaged tokenizer file raises whatever its parser raises
        raise ValueError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__}: "
                         f"{e})") from None
