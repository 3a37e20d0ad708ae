"""Decode throughput and peak memory: EdgeKV's KV formats vs transformers' generate.

On one model and one set of prompts (fixed-seed random token ids of mixed lengths), each
configuration generates the same number of new tokens per prompt, greedily, EOS ignored:
  - edgekv        ``LLM.generate`` for each KV format in --formats (continuous batching:
                  all prompts of a batch go to one ``generate`` call);
  - hf-dynamic    transformers ``model.generate`` with its default (dynamic) cache;
  - hf-quantized  transformers with ``cache_implementation="quantized"`` (4-bit), only when
                  optimum-quanto or hqq is installed; otherwise a line says it was skipped.
Batch 1 is the first prompt alone; batch N is the first N prompts (transformers: one
left-padded batch with an attention mask).

Every configuration runs in a fresh subprocess (this script with the hidden ``--one``
flag), so memory is not shared between them. It loads the model, runs once to warm up,
then times --repeats runs and keeps the fastest (the machine may be shared; the fastest
run is the least disturbed one), then times the prompts alone (one new token) the same
way. With --rounds N every configuration runs N times, interleaved (round 1 runs each
once, then round 2, ...), so a burst of others' load hits all of them alike; the median
of the rounds is reported, with the load average at the start of each round. CPU runs use
--threads 1 by default: with one thread per core, a core taken by another process stalls
every op at its thread barrier, and runs on a busy 2-core machine slowed down 10-50x at
random. --threads 1,2 runs everything at both and prints the speed-up from the second
thread. Reported per configuration:
  tok/s      generated tokens / wall time of one run (prefill included)
  vs hf      tok/s over hf-dynamic's at the same batch and threads
  prefill    prompt tokens / wall time of the prompts alone (one new token)
  decode     tokens after the first / (whole run - prompts alone); dec/hf and dec/fp16:
             over hf-dynamic's and over EdgeKV fp16's decode at the same batch and threads
  peak MiB   memory growth during generation: on CUDA ``max_memory_allocated`` above what
             was allocated after loading; on CPU the peak RSS (its high-water mark is reset
             after loading) above the RSS after loading. EdgeKV allocates its KV pool while
             loading, so the KV bytes in use at its peak (``kv_stats()``) are added.
             ``rss_peak_bytes`` in the JSON: the process's whole peak RSS.
  KV MiB     KV bytes at the peak: EdgeKV ``kv_stats()["bytes_used"]``; transformers' dynamic
             cache tensors after generation ('-' where the cache cannot be sized)
  same       share of generated tokens equal to hf-dynamic's at the same batch, counted
             up to each prompt's first difference. With random weights logits are nearly
             flat, so quantized formats diverge early: this flags broken paths, it does not
             measure accuracy (``edgekv eval`` does).
With --load (always in the suite's first Qwen case): peak RSS while loading the checkpoint
on the CPU and reading each weight once, above the RSS with the loading libraries imported
(that baseline, interpreter + torch, is in the JSON as ``baseline_rss_bytes``), for
EdgeKV's loader and transformers' ``from_pretrained``, over the weights' own bytes.

    python scripts/bench_throughput.py           # random demo-shaped Llama, ~1.5 min on 2 CPUs
    python scripts/bench_throughput.py --model DIR --formats fp16,int8,int4,fp8 \\
        --batches 1,16 --new-tokens 64 --json out.json
    python scripts/bench_throughput.py --suite --rounds 3 --threads 1,2 --json out.json
        # the bundled demo model (fp32 weights) at batch 1 and 16, and a random-weight
        # Qwen2.5-0.5B-shaped model (2.0 GB fp32) at 2K and 8K context, batch 1 and 8,
        # with loading memory (long: the 8K cases prefill 64K tokens per configuration)
    python scripts/bench_throughput.py --quick   # the suite's every path on tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The bundled demo model's shape (DESIGN.md): GQA with 4 query heads per KV head.
DEMO_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, intermediate_size=768,
                  vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Qwen2.5-0.5B's shape (random weights): 2.0 GB of fp32 weights, 12 KiB of fp16 KV per token.
QWEN05_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
# --quick: the same families, shrunk so that the whole suite runs in seconds
QUICK_DEMO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256)
QUICK_QWEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=512)
FIRST_PROMPT_ID = 3  # prompts avoid pad / bos / eos of the demo model
HF_QUANT_BITS = 4
MiB = 2**20

# (track, new tokens) -> (token ids per prompt, KV bytes at the peak or None); ``track``
# asks for the KV peak
Generate = Callable[..., tuple[list[list[int]], int | None]]  # (track, new_tokens, short=)


# ---- inputs ----------------------------------------------------------------------------
def build_demo_model(path: Path, seed: int = 0, **overrides) -> Path:
    """Random-weight fp32 Llama of the demo shape, saved as safetensors under ``path``."""
    return build_random_model(path, "llama", seed, **{**DEMO_SHAPE, **overrides})


def build_random_model(path: Path, family: str, seed: int = 0, **shape) -> Path:
    """Random-weight fp32 model (``family``: "llama" | "qwen2") of ``shape`` (config
    fields), saved as safetensors under ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](**shape)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # wider than the default init: peakier logits, fewer greedy ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def model_limits(model_dir: str) -> tuple[int, int]:
    """(vocab size, context length) from the checkpoint's config.json."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    hf = hf.get("text_config", hf)
    return hf["vocab_size"], hf.get("max_position_embeddings", 2048)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    first = min(FIRST_PROMPT_ID, vocab - 1)
    return [[rng.randrange(first, vocab) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


# ---- one configuration (child process) ---------------------------------------------------
class PeakMemory:
    """Memory growth from construction on: CUDA allocator peak, or the CPU RSS high-water
    mark (reset here through /proc/self/clear_refs where Linux allows it)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.reset = True
            return
        self.base = _rss_bytes()
        self.reset = _reset_rss_peak()

    def growth(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, _peak_rss_bytes() - self.base)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs: the peak so far is the best baseline there is
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, which clear_refs resets. Not ru_maxrss there:
    after exec it also counts the parent's RSS at fork time, which no reset clears."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def edgekv_runner(a: argparse.Namespace, prompts: list[list[int]], fmt: str) -> Generate:
    from edgekv import LLM, SamplingParams

    # no prefix caching: every timed run repeats the warm-up's prompts, which would then
    # be cache hits that transformers has to compute
    llm = LLM(model=a.model, kv_format=fmt, kv_memory=a.kv_memory, dtype=a.dtype,
              device=a.device, max_num_seqs=max(64, len(prompts)), prefix_caching=False)

    def generate(track: bool, new_tokens: int, short: bool = False
                 ) -> tuple[list[list[int]], int | None]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        peak = _watch_kv_bytes(llm) if track else None
        try:
            outs = llm.generate([prompts[0][:8]] if short else prompts, params)
        finally:
            llm.engine.scheduler.__dict__.pop("schedule", None)
        return [o.token_ids for o in outs], (peak[0] if peak else None)

    return generate


def _watch_kv_bytes(llm) -> list[int]:
    """Record the largest ``kv_stats()["bytes_used"]`` seen right after each schedule()
    (when the step's blocks are allocated and none is yet freed). ``generate`` frees every
    block before it returns, so the peak cannot be read afterwards."""
    peak = [0]
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def watched():
        batch = schedule()
        peak[0] = max(peak[0], llm.kv_stats()["bytes_used"])
        return batch

    scheduler.schedule = watched  # instance attribute: the caller pops it again
    return peak


def hf_runner(a: argparse.Namespace, prompts: list[list[int]], quant: str | None) -> Generate:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=a.dtype).to(a.device)
    model.eval()
    model.generation_config.stop_strings = None  # like ignore_eos (the demo model sets some)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad, a.device)  # (B, L) each
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=pad)  # no EOS: ignore_eos
    if quant:
        kwargs.update(cache_implementation="quantized",
                      cache_config={"backend": quant, "nbits": HF_QUANT_BITS})

    def generate(track: bool, new_tokens: int, short: bool = False
                 ) -> tuple[list[list[int]], int | None]:
        if short:
            with torch.inference_mode():
                model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:],
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            return [], None
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, return_dict_in_generate=track,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 **kwargs)
        seqs = out.sequences if track else out  # (B, L + new)
        kv = _hf_cache_bytes(out.past_key_values) if track else None
        return seqs[:, ids.shape[1]:].tolist(), kv

    return generate


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest prompt), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _hf_cache_bytes(cache) -> int | None:
    """Bytes of a dynamic cache's K/V tensors; None for caches stored another way."""
    import transformers as tf

    if not isinstance(cache, tf.DynamicCache):
        return None
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def timed(generate: Generate, repeats: int, device: torch.device, new_tokens: int,
          warm_up: bool = True) -> tuple[list[list[int]], int | None, float]:
    """Warm up once (observing the KV peak), then the fastest of ``repeats`` runs."""
    kv_bytes = generate(True, new_tokens)[1] if warm_up else None
    best, tokens = float("inf"), []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens, _ = generate(False, new_tokens)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return tokens, kv_bytes, best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(a: argparse.Namespace) -> dict:
    """Measure one "system:format:batch:threads" configuration in this process."""
    system, fmt, batch, threads = a.one.split(":")
    batch, device = int(batch), torch.device(a.device)
    if int(threads):
        torch.set_num_threads(int(threads))
    if system.startswith("load-"):
        return run_load(a, system)
    vocab, _ = model_limits(a.model)
    prompts = make_prompts(max(a.batches), *a.prompt_lens, vocab, a.seed)[:batch]
    if system == "edgekv":
        generate = edgekv_runner(a, prompts, fmt)
    else:
        generate = hf_runner(a, prompts, fmt.split("/")[1] if system == "hf-quantized" else None)
    generate(False, 2, short=True)  # one-time work (imports, compiled kernels) before the peak
    memory = PeakMemory(device)
    tokens, kv_bytes, seconds = timed(generate, a.repeats, device, a.new_tokens)
    # the prompts alone (one new token): prefill; what the full run takes beyond it: decode
    prefill = timed(generate, a.repeats, device, 1, warm_up=False)[2]
    growth = memory.growth()
    peak = growth + (kv_bytes or 0) if system == "edgekv" else growth
    generated = sum(len(t) for t in tokens)
    decode = (batch * (a.new_tokens - 1) / (seconds - prefill)
              if a.new_tokens > 1 and seconds > prefill else None)
    return {"system": system, "format": fmt, "batch": batch, "generated": generated,
            "expected": batch * a.new_tokens, "seconds": seconds,
            "tokens_per_s": generated / seconds, "prefill_seconds": prefill,
            "prefill_tokens_per_s": sum(map(len, prompts)) / prefill,
            "decode_tokens_per_s": decode, "peak_bytes": peak, "kv_bytes": kv_bytes,
            "rss_peak_bytes": _peak_rss_bytes() if device.type == "cpu" else None,
            "peak_reset": memory.reset, "threads": torch.get_num_threads(), "token_ids": tokens}


def run_load(a: argparse.Namespace, system: str) -> dict:
    """Peak RSS while loading the checkpoint on the CPU and reading every weight once (a
    loader that maps the file lazily pays when the weights are first used), above the RSS
    once the libraries that load it are imported (the interpreter + torch baseline,
    reported apart as ``baseline_rss_bytes``)."""
    if system == "load-edgekv":
        from edgekv.models import load_model

        def load():
            return load_model(a.model, torch.device("cpu"), a.dtype)[0]
    else:
        import transformers as tf

        arch = json.loads((Path(a.model) / "config.json").read_text())["architectures"][0]
        getattr(tf, arch)  # import the modeling code before the baseline

        def load():
            return tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=a.dtype)
    base = _rss_bytes()
    reset = _reset_rss_peak()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # read every weight once: lazily mapped ones become resident
        for p in model.parameters():
            p.sum()
    peak = _peak_rss_bytes() - base
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"system": system, "format": a.dtype, "batch": 0, "seconds": seconds,
            "peak_bytes": peak, "weights_bytes": weights, "peak_over_weights": peak / weights,
            "baseline_rss_bytes": base, "peak_reset": reset,
            "threads": torch.get_num_threads()}


# ---- the comparison (parent process) ------------------------------------------------------
def hf_quant_backend() -> tuple[str | None, str]:
    """The backend transformers' quantized cache can use here, or None and why not."""
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    if is_optimum_quanto_available():
        return "quanto", ""
    if is_hqq_available():
        return "hqq", ""
    return None, ("neither optimum-quanto nor hqq is importable (transformers' quantized "
                  "cache needs one of them)")


def plan(a: argparse.Namespace, dtype_name: str, quant: str | None) -> list[str]:
    """Configurations as "system:format:batch:threads"; hf-dynamic first in each batch (the
    ratio's base); with ``a.load``, the two loaders' memory first."""
    out = []
    for t in a.threads:
        if a.load:
            out += [f"load-edgekv:{dtype_name}:0:{t}", f"load-hf:{dtype_name}:0:{t}"]
        for b in a.batches:
            out.append(f"hf-dynamic:{dtype_name}:{b}:{t}")
            if quant:
                out.append(f"hf-quantized:int{HF_QUANT_BITS}/{quant}:{b}:{t}")
            out.extend(f"edgekv:{f}:{b}:{t}" for f in a.formats)
    return out


def spawn(a: argparse.Namespace, config: str) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config,
           "--model", a.model, "--new-tokens", str(a.new_tokens),
           "--batches", ",".join(map(str, a.batches)),
           "--prompt-lens", ",".join(map(str, a.prompt_lens)), "--seed", str(a.seed),
           "--device", a.device, "--dtype", a.dtype, "--kv-memory", a.kv_memory,
           "--repeats", str(a.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        system, fmt, batch, threads = config.split(":")
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"system": system, "format": fmt, "batch": int(batch), "threads": int(threads),
                "error": tail}
    return json.loads(lines[-1])


MEDIAN_KEYS = ("seconds", "tokens_per_s", "prefill_seconds", "prefill_tokens_per_s",
               "decode_tokens_per_s", "peak_bytes", "rss_peak_bytes", "peak_over_weights")


def merge_rounds(runs: list[dict]) -> dict:
    """One row from a configuration's runs (one per round): the median of every timing and
    peak, the rest from the first run; a configuration failed if any of its runs did."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    row = dict(runs[0])
    for k in MEDIAN_KEYS:
        values = [r[k] for r in runs if r.get(k) is not None]
        if values:
            row[k] = statistics.median(values)
    row["rounds"] = len(runs)
    row["tokens_per_s_runs"] = [r.get("tokens_per_s") for r in runs]
    return row


def compare(rows: list[dict]) -> None:
    """Add ``vs_hf`` (throughput ratio) and ``same_tokens`` against hf-dynamic at the same
    batch and threads, ``decode_vs_hf`` and ``decode_vs_fp16`` (EdgeKV's fp16), in place."""
    def key(r):
        return r["batch"], r.get("threads")

    ok = [r for r in rows if "error" not in r and not r["system"].startswith("load-")]
    base = {key(r): r for r in ok if r["system"] == "hf-dynamic"}
    fp16 = {key(r): r for r in ok if r["system"] == "edgekv" and r.get("format") == "fp16"}
    for r in ok:
        for name, ref in (("hf", base.get(key(r))), ("fp16", fp16.get(key(r)))):
            if ref is not None and r.get("decode_tokens_per_s") and \
                    ref.get("decode_tokens_per_s"):
                r[f"decode_vs_{name}"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        ref = base.get(key(r))
        if ref is None:
            continue
        r["vs_hf"] = r["tokens_per_s"] / ref["tokens_per_s"]
        same = sum(_common_prefix(x, y) for x, y in zip(r["token_ids"], ref["token_ids"],
                                                          strict=True))
        r["same_tokens"] = same / max(1, ref["generated"])


def _common_prefix(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def thread_speedups(rows: list[dict]) -> list[dict]:
    """For every configuration measured at 1 and at more threads: tok/s there over tok/s at 1
    (the whole run and decode alone)."""
    ok = [r for r in rows if "error" not in r and not r["system"].startswith("load-")]
    one = {(r["system"], r["format"], r["batch"]): r for r in ok if r["threads"] == 1}
    out = []
    for r in ok:
        ref = one.get((r["system"], r["format"], r["batch"]))
        if ref is None or r["threads"] == 1:
            continue
        dec = (r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
               if r.get("decode_tokens_per_s") and ref.get("decode_tokens_per_s") else None)
        out.append({"system": r["system"], "format": r["format"], "batch": r["batch"],
                    "threads": r["threads"], "speedup": r["tokens_per_s"] / ref["tokens_per_s"],
                    "decode_speedup": dec})
    return out


def describe(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    if r["system"].startswith("load-"):
        return (f"peak +{r['peak_bytes'] / MiB:.0f} MiB = {r['peak_over_weights']:.2f}x the "
                f"weights, {r['seconds']:.1f} s")
    return (f"{r['tokens_per_s']:.1f} tok/s, peak +{r['peak_bytes'] / MiB:.1f} MiB, "
            f"{r['seconds']:.1f} s per run")


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def print_table(rows: list[dict]) -> None:
    runs = [r for r in rows if not r["system"].startswith("load-")]
    print(f"{'system':<14}{'format':<13}{'batch':>6}{'thr':>4}{'tok/s':>9}{'vs hf':>8}"
          f"{'prefill':>9}{'decode':>9}{'dec/hf':>8}{'dec/fp16':>9}{'peak MiB':>10}"
          f"{'KV MiB':>8}{'same':>7}")
    for r in runs:
        head = f"{r['system']:<14}{r['format']:<13}{r['batch']:>6}{r.get('threads', '-'):>4}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
            continue
        kv = r["kv_bytes"] / MiB if r["kv_bytes"] is not None else None
        print(f"{head}{r['tokens_per_s']:>9.1f}{_fmt(r.get('vs_hf'), '.2f', 'x'):>8}"
              f"{_fmt(r.get('prefill_tokens_per_s'), '.1f'):>9}"
              f"{_fmt(r.get('decode_tokens_per_s'), '.1f'):>9}"
              f"{_fmt(r.get('decode_vs_hf'), '.2f', 'x'):>8}"
              f"{_fmt(r.get('decode_vs_fp16'), '.2f', 'x'):>9}"
              f"{r['peak_bytes'] / MiB:>10.1f}{_fmt(kv, '.2f'):>8}"
              f"{_fmt(r.get('same_tokens'), '.0%'):>7}")
    loads = [r for r in rows if r["system"].startswith("load-")]
    if loads:
        print(f"\n{'loading':<14}{'dtype':<10}{'thr':>4}{'weights MiB':>13}{'peak MiB':>10}"
              f"{'peak/weights':>14}{'seconds':>9}   (peak RSS above the imported libraries)")
    for r in loads:
        head = f"{r['system'][5:]:<14}{r['format']:<10}{r.get('threads', '-'):>4}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
            continue
        print(f"{head}{r['weights_bytes'] / MiB:>13.0f}{r['peak_bytes'] / MiB:>10.0f}"
              f"{r['peak_over_weights']:>13.2f}x{r['seconds']:>9.1f}")
    speedups = thread_speedups(rows)
    if speedups:
        print(f"\n{'speed-up from threads':<22}{'format':<13}{'batch':>6}{'thr':>4}"
              f"{'tok/s':>8}{'decode':>8}   (over the same configuration at 1 thread)")
    for s in speedups:
        print(f"{s['system']:<22}{s['format']:<13}{s['batch']:>6}{s['threads']:>4}"
              f"{s['speedup']:>7.2f}x{_fmt(s['decode_speedup'], '.2f', 'x'):>8}")


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_all(a: argparse.Namespace) -> dict:
    """Every configuration of one model, each in its own process, in ``a.rounds``
    interleaved rounds (each round runs every configuration once, so a burst of load on a
    shared machine hits all of them alike); the median of the rounds counts."""
    vocab, context = model_limits(a.model)
    if a.prompt_lens[1] + a.new_tokens > context:
        raise ValueError(f"prompts of up to {a.prompt_lens[1]} tokens + {a.new_tokens} new "
                         f"exceed the model's context of {context}")
    quant, why = hf_quant_backend()
    if quant is None:
        print(f"hf-quantized: skipped: {why}")
    configs = plan(a, a.dtype, quant)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    loads = []
    for k in range(1, a.rounds + 1):
        loads.append(load_average())
        print(f"round {k}/{a.rounds}: {os.cpu_count()} CPUs, 1-min load average {loads[-1]} "
              f"(others' work makes timings noisy)", file=sys.stderr)
        for i, config in enumerate(configs, 1):
            tag = f"[{k}/{a.rounds} {i}/{len(configs)}] {config}"
            print(f"{tag} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            runs[config].append(spawn(a, config))
            print(f"{tag}: {describe(runs[config][-1])} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    rows = [merge_rounds(runs[c]) for c in configs]
    compare(rows)
    print(f"{a.model_label}: {a.batches} x prompts of {a.prompt_lens[0]}-{a.prompt_lens[1]} "
          f"tokens + {a.new_tokens} new, {a.dtype}, median of {a.rounds} round(s); load "
          f"average per round {loads} on {os.cpu_count()} CPUs")
    print_table(rows)
    for r in rows:
        r.pop("token_ids", None)
    return {"model": a.model_label, "device": a.device, "dtype": a.dtype,
            "new_tokens": a.new_tokens, "prompt_lens": a.prompt_lens, "seed": a.seed,
            "kv_memory": a.kv_memory, "repeats": a.repeats, "rounds": a.rounds,
            "threads": a.threads, "load_average": loads,
            "skipped": [] if quant else [{"system": "hf-quantized", "reason": why}],
            "rows": rows, "thread_speedups": thread_speedups(rows)}


def suite_cases(a: argparse.Namespace, tmp: Path) -> list[argparse.Namespace]:
    """--suite: the demo model (batch 1 and 16) and Qwen2.5-0.5B's shape at 2K and 8K
    context (batch 1 and 8, loading measured once); --quick: the same, shrunk to seconds."""
    demo_dir = Path(__file__).resolve().parents[1] / "edgekv" / "demo_model"
    if a.quick:
        demo = dict(label="random demo-family Llama (quick)", batches=[2], prompt_lens=[4, 12],
                    new_tokens=5, model=build_random_model(tmp / "demo", "llama", a.seed,
                                                           **{**DEMO_SHAPE, **QUICK_DEMO}))
        qwen = build_random_model(tmp / "qwen", "qwen2", a.seed, **{**QWEN05_SHAPE,
                                                                    **QUICK_QWEN})
        longs = [(48, [2], True)]
    else:
        demo = dict(label="bundled demo model", batches=[1, 16], prompt_lens=[32, 128],
                    new_tokens=64, model=demo_dir)
        qwen = build_random_model(tmp / "qwen", "qwen2", a.seed, **QWEN05_SHAPE)
        longs = [(2048, [1, 8], True), (8192, [1, 8], False)]
    cases = [{**demo, "load": False, "kv_memory": "256MiB"}]
    hf = json.loads((qwen / "config.json").read_text())
    fp16_per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * \
        (hf["hidden_size"] // hf["num_attention_heads"]) * 2
    for ctx, batches, load in longs:
        new = 5 if a.quick else 32
        kv = fp16_per_token * max(batches) * (ctx + new + 2 * 16) * 1.05
        cases.append(dict(label=f"random Qwen2.5-0.5B-shaped{' (quick)' if a.quick else ''}, "
                          f"{ctx} context", batches=batches, prompt_lens=[ctx, ctx],
                          new_tokens=new, model=qwen, load=load,
                          kv_memory=f"{int(kv // MiB) + 1}MiB"))
    out = []
    for c in cases:
        case = argparse.Namespace(**{**vars(a), **c})
        case.model_label, case.model = c["label"], str(c["model"])
        out.append(case)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF-format model dir (default: a random "
                   "Llama of the demo model's shape, built in a temp dir)")
    p.add_argument("--suite", action="store_true", help="the whole comparison: the bundled "
                   "demo model at batch 1 and 16, Qwen2.5-0.5B's shape (random weights) at "
                   "2K and 8K context, batch 1 and 8, and the loaders' peak memory (long)")
    p.add_argument("--quick", action="store_true", help="--suite on shrunk shapes, one "
                   "batch, one round: every path in seconds")
    p.add_argument("--formats", default="fp16,int8,int4", help="EdgeKV KV formats")
    p.add_argument("--batches", default="1,16", help="concurrent prompts per configuration")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-lens", default="32,128", help="min,max prompt length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="model dtype for both systems: "
                   "float32 | float16 | bfloat16")
    p.add_argument("--kv-memory", default="256MiB", help="EdgeKV's KV pool size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up in "
                   "each process; the fastest counts")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds: every "
                   "configuration runs once per round, in a fresh process; the median counts")
    p.add_argument("--threads", default="1", help="torch CPU threads per run, comma-separated "
                   "(1,2 also prints the speed-up from a second thread; 0: torch's default, "
                   "one per core; fastest on an idle machine, erratic on a busy one)")
    p.add_argument("--load", action="store_true", help="also measure peak RSS while loading "
                   "the checkpoint (EdgeKV's loader and transformers')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one config
    a = p.parse_args(argv)
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    a.batches = [int(b) for b in a.batches.split(",")]
    a.prompt_lens = [int(n) for n in a.prompt_lens.split(",")]
    a.threads = [int(t) for t in a.threads.split(",")]
    if len(a.prompt_lens) != 2 or not 1 <= a.prompt_lens[0] <= a.prompt_lens[1]:
        p.error("--prompt-lens takes MIN,MAX with 1 <= MIN <= MAX")
    if min(a.batches) < 1 or a.new_tokens < 1 or a.repeats < 1 or a.rounds < 1 or \
            min(a.threads) < 0:
        p.error("--batches, --new-tokens, --repeats and --rounds must be positive, "
                "--threads >= 0")
    if a.quick:
        a.suite, a.repeats = True, 1
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.one:
        result = run_one(a)
        print(json.dumps(result))
        return result
    from edgekv.quant import get_format

    for f in a.formats:
        get_format(f)  # a bad name fails here, not in every child
    with tempfile.TemporaryDirectory(prefix="edgekv-bench-") as tmp:
        if a.suite:
            result = {"suite": "quick" if a.quick else "full",
                      "cases": [run_all(c) for c in suite_cases(a, Path(tmp))]}
        else:
            a.model_label = a.model or "random demo-shaped Llama"
            if a.model is None:
                a.model = str(build_demo_model(Path(tmp) / "demo", seed=a.seed))
            result = run_all(a)
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
