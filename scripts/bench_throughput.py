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
run is the least disturbed one). CPU runs use --threads 1 by default: with one thread per
core, a core taken by another process stalls every op at its thread barrier, and runs
on a busy 2-core machine slowed down 10-50x at random. Reported per configuration:
  tok/s      generated tokens / wall time of one run (prefill included)
  vs hf      tok/s over hf-dynamic's at the same batch
  peak MiB   memory growth during generation: on CUDA ``max_memory_allocated`` above what
             was allocated after loading; on CPU the peak RSS (its high-water mark is reset
             after loading) above the RSS after loading. EdgeKV allocates its KV pool while
             loading, so the KV bytes in use at its peak (``kv_stats()``) are added.
  KV MiB     KV bytes at the peak: EdgeKV ``kv_stats()["bytes_used"]``; transformers' dynamic
             cache tensors after generation ('-' where the cache cannot be sized)
  same       share of generated tokens equal to hf-dynamic's at the same batch, counted
             up to each prompt's first difference. With random weights logits are nearly
             flat, so quantized formats diverge early: this flags broken paths, it does not
             measure accuracy (``edgekv eval`` does).

    python scripts/bench_throughput.py           # random demo-shaped Llama, ~1.5 min on 2 CPUs
    python scripts/bench_throughput.py --model DIR --formats fp16,int8,int4,fp8 \\
        --batches 1,16 --new-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
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
FIRST_PROMPT_ID = 3  # prompts avoid pad / bos / eos of the demo model
HF_QUANT_BITS = 4
MiB = 2**20

# (token ids per prompt, KV bytes at the peak or None); ``track`` asks for the KV peak
Generate = Callable[[bool], tuple[list[list[int]], int | None]]


# ---- inputs ----------------------------------------------------------------------------
def build_demo_model(path: Path, seed: int = 0, **overrides) -> Path:
    """Random-weight fp32 Llama of the demo shape, saved as safetensors under ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**{**DEMO_SHAPE, **overrides})
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

    llm = LLM(model=a.model, kv_format=fmt, kv_memory=a.kv_memory, dtype=a.dtype,
              device=a.device, max_num_seqs=max(64, len(prompts)))
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)

    def generate(track: bool) -> tuple[list[list[int]], int | None]:
        peak = _watch_kv_bytes(llm) if track else None
        try:
            outs = llm.generate(prompts, params)
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
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad, a.device)  # (B, L) each
    kwargs = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                  eos_token_id=None, pad_token_id=pad)  # no EOS: like ignore_eos
    if quant:
        kwargs.update(cache_implementation="quantized",
                      cache_config={"backend": quant, "nbits": HF_QUANT_BITS})

    def generate(track: bool) -> tuple[list[list[int]], int | None]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, return_dict_in_generate=track,
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


def timed(generate: Generate, repeats: int, device: torch.device
          ) -> tuple[list[list[int]], int | None, float]:
    """Warm up once (observing the KV peak), then the fastest of ``repeats`` runs."""
    _, kv_bytes = generate(True)
    best, tokens = float("inf"), []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens, _ = generate(False)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return tokens, kv_bytes, best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(a: argparse.Namespace) -> dict:
    """Measure one "system:format:batch" configuration in this process."""
    system, fmt, batch = a.one.split(":")
    batch, device = int(batch), torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    vocab, _ = model_limits(a.model)
    prompts = make_prompts(max(a.batches), *a.prompt_lens, vocab, a.seed)[:batch]
    if system == "edgekv":
        generate = edgekv_runner(a, prompts, fmt)
    else:
        generate = hf_runner(a, prompts, fmt.split("/")[1] if system == "hf-quantized" else None)
    memory = PeakMemory(device)
    tokens, kv_bytes, seconds = timed(generate, a.repeats, device)
    growth = memory.growth()
    peak = growth + (kv_bytes or 0) if system == "edgekv" else growth
    generated = sum(len(t) for t in tokens)
    return {"system": system, "format": fmt, "batch": batch, "generated": generated,
            "expected": batch * a.new_tokens, "seconds": seconds,
            "tokens_per_s": generated / seconds, "peak_bytes": peak, "kv_bytes": kv_bytes,
            "peak_reset": memory.reset, "threads": torch.get_num_threads(), "token_ids": tokens}


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
    """Configurations as "system:format:batch"; hf-dynamic first in each batch (the ratio's
    base)."""
    out = []
    for b in a.batches:
        out.append(f"hf-dynamic:{dtype_name}:{b}")
        if quant:
            out.append(f"hf-quantized:int{HF_QUANT_BITS}/{quant}:{b}")
        out.extend(f"edgekv:{f}:{b}" for f in a.formats)
    return out


def spawn(a: argparse.Namespace, config: str) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config,
           "--model", a.model, "--new-tokens", str(a.new_tokens),
           "--batches", ",".join(map(str, a.batches)),
           "--prompt-lens", ",".join(map(str, a.prompt_lens)), "--seed", str(a.seed),
           "--device", a.device, "--dtype", a.dtype, "--kv-memory", a.kv_memory,
           "--repeats", str(a.repeats), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        system, fmt, batch = config.split(":")
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"system": system, "format": fmt, "batch": int(batch), "error": tail}
    return json.loads(lines[-1])


def compare(rows: list[dict]) -> None:
    """Add ``vs_hf`` (throughput ratio) and ``same_tokens`` against hf-dynamic, in place."""
    base = {r["batch"]: r for r in rows if r["system"] == "hf-dynamic" and "error" not in r}
    for r in rows:
        ref = base.get(r["batch"])
        if "error" in r or ref is None:
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


def describe(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    return (f"{r['tokens_per_s']:.1f} tok/s, peak +{r['peak_bytes'] / MiB:.1f} MiB, "
            f"{r['seconds']:.1f} s per run")


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<14}{'format':<13}{'batch':>6}{'tok/s':>9}{'vs hf':>8}"
          f"{'peak MiB':>10}{'KV MiB':>8}{'same':>7}")
    for r in rows:
        head = f"{r['system']:<14}{r['format']:<13}{r['batch']:>6}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
            continue
        ratio = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        kv = f"{r['kv_bytes'] / MiB:.2f}" if r["kv_bytes"] is not None else "-"
        same = f"{r['same_tokens']:.0%}" if "same_tokens" in r else "-"
        print(f"{head}{r['tokens_per_s']:>9.1f}{ratio:>8}{r['peak_bytes'] / MiB:>10.1f}"
              f"{kv:>8}{same:>7}")


def run_all(a: argparse.Namespace) -> dict:
    vocab, context = model_limits(a.model)
    if a.prompt_lens[1] + a.new_tokens > context:
        raise ValueError(f"prompts of up to {a.prompt_lens[1]} tokens + {a.new_tokens} new "
                         f"exceed the model's context of {context}")
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load} (others' work makes "
          f"timings noisy)", file=sys.stderr)
    quant, why = hf_quant_backend()
    if quant is None:
        print(f"hf-quantized: skipped: {why}")
    configs = plan(a, a.dtype, quant)
    rows = []
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows.append(spawn(a, config))
        print(f"[{i}/{len(configs)}] {config}: {describe(rows[-1])} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    compare(rows)
    print_table(rows)
    for r in rows:
        r.pop("token_ids", None)
    return {"model": a.model_label, "device": a.device, "dtype": a.dtype,
            "new_tokens": a.new_tokens, "prompt_lens": a.prompt_lens, "seed": a.seed,
            "kv_memory": a.kv_memory, "repeats": a.repeats, "threads": a.threads,
            "load_average": load,
            "skipped": [] if quant else [{"system": "hf-quantized", "reason": why}],
            "rows": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF-format model dir (default: a random "
                   "Llama of the demo model's shape, built in a temp dir)")
    p.add_argument("--formats", default="fp16,int8,int4", help="EdgeKV KV formats")
    p.add_argument("--batches", default="1,16", help="concurrent prompts per configuration")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-lens", default="32,128", help="min,max prompt length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="model dtype for both systems: "
                   "float32 | float16 | bfloat16")
    p.add_argument("--kv-memory", default="256MiB", help="EdgeKV's KV pool size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; "
                   "the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: "
                   "torch's default, one per core; fastest on an idle machine, erratic on a "
                   "busy one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one config
    a = p.parse_args(argv)
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    a.batches = [int(b) for b in a.batches.split(",")]
    a.prompt_lens = [int(n) for n in a.prompt_lens.split(",")]
    if len(a.prompt_lens) != 2 or not 1 <= a.prompt_lens[0] <= a.prompt_lens[1]:
        p.error("--prompt-lens takes MIN,MAX with 1 <= MIN <= MAX")
    if min(a.batches) < 1 or a.new_tokens < 1 or a.repeats < 1 or a.threads < 0:
        p.error("--batches, --new-tokens and --repeats must be positive, --threads >= 0")
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
