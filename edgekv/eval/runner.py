"""``edgekv.eval.run``: measure every configuration against the fp16 cache, row by row.

    plan      text -> token ids -> windows, decode windows, prompts, passkey lengths
    fp32      per-layer attention reference (inputs and outputs of every layer)
    fp16      the baseline: prefill perplexity, token-by-token logits, greedy continuations
    formats   each requested KV format, measured the same way and compared with fp16
    eviction  each format x policy x budget over the decode windows, token by token
              (eviction acts between tokens) or in prefill chunks (``eviction_chunk``)
    peers     transformers' caches on the same model, text and windows

One model is loaded at a time (each configuration gets a fresh ``LLM``), so peak memory
is one model plus the baseline's decode logits: decode_windows x window x vocab x 4 bytes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgekv.auto import parse_auto
from edgekv.names import renamed
from edgekv.quant import get_format

from .config import BASELINE, EvalConfig
from .data import Window, make_prompts, make_windows, read_documents, tokenize
from .layers import capture, layer_errors
from .metrics import Tally, delta_pct, kl_top1, nll_sum
from .passkey import ANSWER_TOKENS, default_lengths, fixed_length, run_passkey
from .peers import HFSubject, load_hf_model, select_peers
from .subjects import EdgeKVSubject, Subject

log = logging.getLogger("edgekv")

Progress = Callable[[int, int, str], None]  # (units done, units total, what runs now)


@dataclass
class Plan:
    """What every configuration is measured on (the same for all of them)."""

    cfg: EvalConfig
    model_dir: Path
    model_config: object  # edgekv.models.ModelConfig
    tokenizer: object
    windows: list[Window]
    decode: list[Window]
    prompts: list[list[int]]
    passkey_lengths: list[int]
    kv_tokens: int  # tokens each configuration's KV pool holds
    settings: dict
    notes: list[str] = field(default_factory=list)


@dataclass
class Baseline:
    """The fp16 cache's results that every other row is compared with."""

    prefill_ppl: float | None = None
    decode_ppl: float | None = None
    decode_logits: list[torch.Tensor] = field(default_factory=list)  # per window (W, V)
    greedy: list[list[int]] = field(default_factory=list)
    layer_ref: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # fp32 in, out


def run(config: EvalConfig | None = None, *, progress: Progress | None = None,
        on_row: Callable[[dict], None] | None = None, **kwargs) -> list[dict]:
    """Measure ``config`` (or ``EvalConfig(**kwargs)``) and return one row per
    configuration, the fp16 baseline first (see ``report.COLUMNS`` for the fields).
    ``on_row`` sees each row as soon as it is measured. Raises ValueError on bad input."""
    if "kv_residual" in kwargs:  # the old name of exact_window
        warnings.warn("run(kv_residual=) is now run(exact_window=)", FutureWarning, stacklevel=2)
        kwargs["exact_window"] = renamed(kwargs.get("exact_window"), kwargs.pop("kv_residual"),
                                         "exact_window", "kv_residual")
    cfg = config if config is not None else EvalConfig(**kwargs)
    plan = make_plan(cfg)
    peers, peer_notes = select_peers(cfg.peers)
    plan.notes.extend(peer_notes)
    evict = [(f, p, b) for f in cfg.measured_formats for p in cfg.eviction
             for b in cfg.budget_tokens(len(plan.windows[0].inputs))]
    configs = sum(len(cfg.exact_windows(f)) for f in cfg.measured_formats)
    counter = _Counter(progress, _total_units(plan, configs, len(evict) + len(cfg.tiers),
                                              peers))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    base = Baseline()
    if cfg.layer_tokens and plan.model_config.num_layers:
        counter.stage("fp32 reference")
        ref = _edgekv(plan, "fp32")
        try:
            base.layer_ref = capture(ref.llm, plan.windows[0].inputs[: cfg.layer_tokens])
        finally:
            ref.close()
        counter.tick()
    for fmt in cfg.measured_formats:
        for r in cfg.exact_windows(fmt):
            emit(_measure(_edgekv(plan, fmt, exact=r), plan, base, counter))
    for spec in cfg.tiers:
        emit(_measure(_edgekv(plan, "fp16", tiers=spec), plan, base, counter))
    for fmt, policy, budget in evict:
        emit(_measure(_edgekv(plan, fmt, policy, budget), plan, base, counter))
    if peers:
        _run_peers(peers, plan, base, counter, emit)
    for row in rows:  # notes found late (a peer that failed) reach every row
        row["run_notes"] = "; ".join(plan.notes)
    return rows


def make_plan(cfg: EvalConfig) -> Plan:
    """Resolve the model, read and cut the text; raises ValueError on bad input."""
    import transformers
    from transformers import AutoTokenizer

    import edgekv
    from edgekv.llm import DEMO_MODEL_DIR
    from edgekv.models.loader import read_config, resolve_model_dir

    model_dir = resolve_model_dir(cfg.model if cfg.model is not None else DEMO_MODEL_DIR)
    _, mc = read_config(model_dir)
    text = cfg.text
    if text is None:
        if not (model_dir / "heldout.txt").is_file():
            raise ValueError(f"{model_dir} has no heldout.txt: give a text file (--text)")
        text = str(model_dir / "heldout.txt")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenize(read_documents(text), tokenizer)
    window = cfg.window or min(mc.max_position, 1024)
    if window > mc.max_position:
        raise ValueError(f"window {window} is longer than the model's context "
                         f"({mc.max_position} tokens)")
    stride = cfg.stride or window
    windows = make_windows(ids, window, stride, cfg.max_windows)
    if cfg.prompt_len + cfg.gen_len > mc.max_position:
        raise ValueError(f"prompt_len + gen_len ({cfg.prompt_len + cfg.gen_len}) exceed the "
                         f"model's context ({mc.max_position})")
    prompts = make_prompts(ids, cfg.prompts, cfg.prompt_len) if cfg.gen_len else []
    if cfg.eviction and not cfg.decode_windows:
        raise ValueError("eviction is measured over the decode windows: give decode_windows >= 1")
    notes, lengths = [], []
    if cfg.passkey and cfg.passkey_lengths:
        lengths = sorted(cfg.passkey_lengths)
        if lengths[-1] + ANSWER_TOKENS > mc.max_position:
            raise ValueError(f"passkey length {lengths[-1]} does not fit the model's context "
                             f"({mc.max_position} tokens)")
    elif cfg.passkey and mc.max_position >= cfg.passkey_min_context:
        lengths = default_lengths(mc.max_position)
    elif cfg.passkey:
        notes.append(f"passkey: skipped, the model's context ({mc.max_position} tokens) is "
                     f"shorter than {cfg.passkey_min_context}")
    if lengths and lengths[0] < fixed_length(tokenizer):
        raise ValueError(f"passkey length {lengths[0]} is too short: the prompt's fixed parts "
                         f"take {fixed_length(tokenizer)} tokens")
    seqs = max(len(prompts), len(cfg.passkey_depths) * cfg.passkey_trials if lengths else 0)
    bs = cfg.block_size
    kv_tokens = max(window + bs, len(prompts) * (cfg.prompt_len + cfg.gen_len + bs),
                    (len(cfg.passkey_depths) * cfg.passkey_trials * (lengths[-1] + 2 * bs)
                     if lengths else 0))
    settings = {
        "model": str(cfg.model) if cfg.model is not None else "demo",
        "text": text if cfg.text is not None else "heldout.txt (bundled)",
        "text_tokens": len(ids), "dtype": cfg.dtype,
        "device": cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "window": window, "stride": stride, "ppl_windows": len(windows),
        "decode_windows": min(cfg.decode_windows, len(windows)),
        "prompts": len(prompts), "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len,
        "layer_tokens": min(cfg.layer_tokens, window), "block_size": bs, "seed": cfg.seed,
        "eviction_chunk": cfg.eviction_chunk,
        "edgekv": edgekv.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return Plan(cfg, model_dir, mc, tokenizer, windows, windows[: cfg.decode_windows],
                prompts, lengths, kv_tokens + seqs * bs, settings, notes)


def _edgekv(plan: Plan, fmt: str, policy: str | None = None,
            budget: int | None = None, exact: int = 0,
            tiers: str | None = None) -> EdgeKVSubject:
    cfg, mc = plan.cfg, plan.model_config
    widest = BASELINE if parse_auto(fmt) is not None else fmt  # auto: at most fp16's bytes
    per_token = mc.num_layers * get_format(widest).bytes_per_token(mc.num_kv_heads,
                                                                   mc.head_dim)
    seqs = max(len(plan.prompts), len(cfg.passkey_depths) * cfg.passkey_trials, 1)
    return EdgeKVSubject(plan.model_dir, fmt, plan.kv_tokens * per_token, eviction=policy,
                         kv_budget=budget, block_size=cfg.block_size, dtype=cfg.dtype,
                         device=cfg.device, seed=cfg.seed, max_num_seqs=seqs,
                         decode_chunk=cfg.eviction_chunk if policy is not None else 1,
                         exact_window=exact, kv_tiers=tiers,
                         window=len(plan.windows[0].inputs))


def _run_peers(peers: list[str], plan: Plan, base: Baseline, counter, emit) -> None:
    cfg = plan.cfg
    try:
        model = load_hf_model(plan.model_dir, cfg.dtype, plan.settings["device"])
    except Exception as e:  # an architecture transformers cannot load: say so, go on
        log.warning("transformers could not load %s: %s", plan.model_dir, e)
        plan.notes.append(f"peers: not measured, transformers could not load the model "
                          f"({type(e).__name__})")
        return
    for name in peers:
        try:
            subject = HFSubject(model, name, cfg.peer_residual)
        except (ImportError, ValueError, RuntimeError) as e:
            log.warning("peer %s is unavailable: %s", name, e)
            plan.notes.append(f"peer {name}: not measured ({type(e).__name__}: {e})")
            counter.tick(_units(plan, prefill=name == "hf", layers=False))
            continue
        if not subject.prefill_reflects_cache and not plan.decode:
            plan.notes.append(f"peer {name}: not measured, it needs decode_windows >= 1")
            counter.tick(_units(plan, prefill=False, layers=False))
            continue
        emit(_measure(subject, plan, base, counter))
    del model


def _measure(subject: Subject, plan: Plan, base: Baseline, counter: _Counter) -> dict:
    """All metrics of one configuration; the fp16 baseline run fills ``base`` first."""
    is_base = subject.name == BASELINE and subject.backend == "edgekv" and \
        subject.eviction is None and not subject.exact_window and subject.tiers is None
    label = subject.name + (f" {subject.eviction}@{subject.kv_budget}" if subject.eviction
                            else "") + (f" +w{subject.exact_window}" if subject.exact_window
                                        and subject.backend == "edgekv" else "")
    prefill, decode = Tally(), Tally()
    layers, passkey = None, None
    try:
        torch.manual_seed(plan.cfg.seed)
        if subject.prefill_reflects_cache:
            counter.stage(f"{label}: perplexity")
            for w in plan.windows:
                logits = subject.logits(w.inputs, decode=False)[w.scored :]  # (S, V)
                prefill.add_nll(nll_sum(logits, torch.tensor(w.targets[w.scored :])),
                                len(w.targets) - w.scored)
                counter.tick()
        counter.stage(f"{label}: token by token")
        for i, w in enumerate(plan.decode):
            logits = subject.logits(w.inputs, decode=True)  # (W, V)
            decode.add_nll(nll_sum(logits, torch.tensor(w.targets)), len(w.targets))
            if is_base:
                base.decode_logits.append(logits)
            decode.add_kl(*kl_top1(base.decode_logits[i], logits), len(w.targets))
            counter.tick()
        if plan.prompts:
            counter.stage(f"{label}: greedy")
            outs = subject.greedy(plan.prompts, plan.cfg.gen_len)
            if is_base:
                base.greedy = outs
            for ref, out in zip(base.greedy, outs, strict=True):
                decode.add_continuation(ref, out)
            counter.tick()
        if base.layer_ref is not None and isinstance(subject, EdgeKVSubject) \
                and subject.prefill_reflects_cache:
            ids = plan.windows[0].inputs[: plan.cfg.layer_tokens]
            layers = layer_errors(subject.llm, ids, *base.layer_ref)
            counter.tick()
        if plan.passkey_lengths:
            counter.stage(f"{label}: passkey")
            passkey = run_passkey(subject, plan.tokenizer, plan.passkey_lengths,
                                  plan.cfg.passkey_depths, plan.cfg.passkey_trials,
                                  plan.cfg.seed, on_length=lambda _: counter.tick())
    finally:
        subject.close()
    if is_base:
        base.prefill_ppl, base.decode_ppl = prefill.ppl, decode.ppl
    return _row(subject, plan, base, prefill, decode, layers, passkey)


def _row(subject: Subject, plan: Plan, base: Baseline, prefill: Tally, decode: Tally,
         layers: list[float] | None, passkey: dict | None) -> dict:
    use_prefill = subject.prefill_reflects_cache
    tally, base_ppl = (prefill, base.prefill_ppl) if use_prefill else (decode, base.decode_ppl)
    fp16_bytes = plan.model_config.num_layers * get_format(BASELINE).bytes_per_token(
        plan.model_config.num_kv_heads, plan.model_config.head_dim)
    notes = [subject.note] if subject.note else []
    if subject.eviction:
        n = plan.cfg.eviction_chunk
        how = "token by token (chunk_size=1)" if n == 1 else f"in prefill chunks of {n}"
        notes.append(f"eviction: perplexity {how} over {len(plan.decode)} window(s)")
    elif not use_prefill:
        notes.append(f"perplexity token by token over {len(plan.decode)} window(s): a "
                     f"prefill does not read this cache back")
    window = len(plan.windows[0].inputs)
    row = {
        "format": subject.name, "backend": subject.backend, "eviction": subject.eviction,
        "kv_budget": subject.kv_budget, "exact_window": subject.exact_window,
        "kv_budget_frac": subject.kv_budget / window if subject.kv_budget else None,
        "ppl": tally.ppl, "ppl_mode": "prefill" if use_prefill else "decode",
        "ppl_tokens": tally.tokens, "delta_ppl_pct": delta_pct(tally.ppl, base_ppl),
        "ppl_decode": decode.ppl, "delta_ppl_decode_pct": delta_pct(decode.ppl, base.decode_ppl),
        "kl": decode.mean_kl, "top1": decode.top1_rate,
        "greedy_match": decode.mean_matched, "greedy_full": decode.full_rate,
        "attn_rel_err": sum(layers) / len(layers) if layers else None,
        "attn_rel_err_layers": layers,
        "passkey_acc": passkey["mean"] if passkey else None, "passkey": passkey,
        "bytes_per_token": subject.bytes_per_token,
        "kv_vs_fp16": subject.bytes_per_token / fp16_bytes if subject.bytes_per_token else None,
        "notes": "; ".join(notes),
    }
    row.update(plan.settings)
    return row


def _units(plan: Plan, prefill: bool, layers: bool) -> int:
    """Progress units of one configuration: windows, greedy batch, layers, passkey."""
    return ((len(plan.windows) if prefill else 0) + len(plan.decode) + int(bool(plan.prompts))
            + int(layers) + len(plan.passkey_lengths))


def _total_units(plan: Plan, formats: int, evict: int, peers: list[str]) -> int:
    layers = bool(plan.cfg.layer_tokens)
    return (int(layers) + formats * _units(plan, True, layers) + evict * _units(plan, False, False)
            + sum(_units(plan, p == "hf", False) for p in peers))


class _Counter:
    """Reports progress as (done, total, stage) to an optional callback."""

    def __init__(self, callback: Progress | None, total: int):
        self.callback, self.total, self.done, self.desc = callback, total, 0, ""

    def stage(self, desc: str) -> None:
        self.desc = desc
        if self.callback is not None:
            self.callback(self.done, self.total, desc)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total, self.desc)
