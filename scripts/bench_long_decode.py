"""Decode speed at long context: EdgeKV's KV formats vs transformers' DynamicCache.

What a long conversation costs per token once its context is there. Prefilling 8 x 8K
tokens through a 0.5B model takes most of an hour on one CPU thread, and the prefill is
not what this measures, so each system starts from a cache filled with random values
instead (decode reads every cached byte whatever it holds): EdgeKV's blocks get random
codes and scales, transformers' DynamicCache random K/V tensors of the same shape. Then
both run the same loop: one new token per sequence through the model, greedy argmax,
``--steps`` times after 2 warm-up steps. EdgeKV's loop is its model runner (the engine's
step minus scheduling), transformers' its model forward with ``past_key_values``.

Every system runs in a fresh process (this script with the hidden ``--one``), interleaved
over ``--rounds``, and the median per-step time is reported with the load average.

    python scripts/bench_long_decode.py --shape qwen2.5-0.5b --context 8192 --batch 8
    python scripts/bench_long_decode.py --shape kv-heavy --context 4096 --batch 4
    python scripts/bench_long_decode.py --formats int8,int4 --tiers fp16:128,int8:2048,int4

``--tiers SPEC`` (repeatable) adds an age-tiered cache (``LLM(kv_tiers=SPEC)``): each
sequence starts with every block in the tier its age puts it in; its KV bytes include the
exact window's fp16 rings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import build_random_model  # noqa: E402

# Real models' shapes (random weights); kv-heavy: many KV heads, so at long context its KV
# bytes exceed its weights' (113 MB fp32 weights, 256 MiB of fp16 KV at 4 x 4K).
SHAPES = {
    "qwen2.5-0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         intermediate_size=4864, vocab_size=151936),
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256),
    "kv-heavy": dict(family="llama", hidden_size=512, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                     intermediate_size=1376, vocab_size=8192),
}


def _edgekv(a, model_dir: str, fmt: str):
    from edgekv import LLM, SamplingParams
    from edgekv.engine.scheduler import ScheduledBatch

    S, L = a.batch, a.context
    kv_bytes_guess = 4 * S * (L + a.steps + 8) * 2 * 64 * 2 * 48  # generous: sized below
    tiers = fmt.removeprefix("tiers=") if fmt.startswith("tiers=") else None
    llm = LLM(model_dir, dtype="float32", kv_format="int8" if tiers else fmt,
              prefix_caching=False, kv_memory=f"{max(64 * 2**20, kv_bytes_guess) // 2**20}MiB",
              max_num_seqs=S, kv_tiers=tiers)
    eng, g = llm.engine, torch.Generator().manual_seed(0)
    seqs = [eng.new_sequence([3 + i] * L, SamplingParams(max_tokens=1)) for i in range(S)]
    layout, bs = eng.cache_config.tiers, eng.cache_config.block_size
    for s in seqs:
        if layout is None:
            eng.manager.append_slots(s.seq_id, L)
        else:  # each block in the tier its age puts it in
            nb = -(-L // bs)
            eng.manager.adopt(s.seq_id, [layout.due(L - min((i + 1) * bs, L))
                                         for i in range(nb)], L)
        s.num_computed = L
    stores = [kv for tier in eng.cache.tier_layers for kv in tier]
    for k, v in stores:  # random codes, scales in a sane range
        for store in (k, v):
            d = store.data
            if d.dtype.is_floating_point:
                d.copy_(torch.randn(d.shape, generator=g).to(d.dtype))
            else:
                d.copy_(torch.randint(0, 256, d.shape, generator=g, dtype=torch.int32)
                        .to(torch.uint8).view(d.dtype))
            for t in (store.scale, store.zero):
                if t is not None:
                    t.copy_((torch.rand(t.shape, generator=g) * 0.02 + 0.01).to(t.dtype))
    stats = llm.kv_stats()
    kv_used = stats["bytes_used"] + (S * stats["exact_window_bytes"] // max(
        1, eng.exact_window.num_slots) if eng.exact_window is not None else 0)
    tokens = torch.full((S,), 5)

    def step():
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            s.token_ids.append(t)
            _, copies = eng.manager.append_slots(s.seq_id, 1)
            eng.cache.copy_blocks(copies)
        logits, _ = eng.runner.run(ScheduledBatch(seqs, [1] * S))
        for s in seqs:
            s.num_computed += 1
        return logits.argmax(-1)

    return step, kv_used


def _hf(a, model_dir: str):
    import transformers as tf

    S, L = a.batch, a.context
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c, g = model.config, torch.Generator().manual_seed(0)
    hkv = c.num_key_value_heads
    cache = tf.DynamicCache()
    for i in range(c.num_hidden_layers):
        cache.update(torch.randn(S, hkv, L, c.head_dim, generator=g),
                     torch.randn(S, hkv, L, c.head_dim, generator=g), i)
    kv_used = 2 * c.num_hidden_layers * S * hkv * L * c.head_dim * 4
    state = {"ids": torch.full((S, 1), 5)}

    def step():
        out = model(input_ids=state["ids"], past_key_values=cache, use_cache=True)
        state["ids"] = out.logits[:, -1].argmax(-1, keepdim=True)
        return state["ids"]

    return step, kv_used


def run_one(a) -> dict:
    torch.set_num_threads(a.threads)
    system, fmt = a.one.split(":", 1)
    with torch.inference_mode():
        step, kv_used = _hf(a, a.model) if system == "hf" else _edgekv(a, a.model, fmt)
        for _ in range(2):
            step()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"system": system, "format": fmt, "step_s": med, "tok_s": a.batch / med,
            "kv_bytes": kv_used, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--model", default=None, help="a model dir instead of --shape's random one")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--formats", default="fp16,int8,int4")
    p.add_argument("--tiers", action="append", default=[], help="age tiers, e.g. "
                   "fp16:128,int8:2048,int4 (repeatable)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a)))
        return
    label = Path(a.model).name if a.model else a.shape
    with tempfile.TemporaryDirectory() as tmp:
        if a.model is None:
            shape = dict(SHAPES[a.shape])
            a.model = str(build_random_model(Path(tmp) / a.shape, shape.pop("family"),
                                             max_position_embeddings=4 * a.context, **shape))
        systems = ["hf:float32"] + [f"edgekv:{f}" for f in a.formats.split(",")] + [
            f"edgekv:tiers={t}" for t in a.tiers]
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        loads = []
        for r in range(a.rounds):
            loads.append(os.getloadavg()[0])
            for s in systems:
                cmd = [sys.executable, __file__, "--one", s, "--model", a.model,
                       "--context", str(a.context), "--batch", str(a.batch),
                       "--steps", str(a.steps), "--threads", str(a.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{s} failed:\n{out.stderr[-2000:]}")
                runs[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{a.rounds} {s}: {runs[s][-1]['tok_s']:.2f} tok/s",
                      flush=True)
    rows = []
    for s in systems:
        tok = statistics.median(x["tok_s"] for x in runs[s])
        rows.append({**runs[s][0], "tok_s": tok, "tok_s_runs": [x["tok_s"] for x in runs[s]]})
    hf = rows[0]["tok_s"]
    fp16 = next((r["tok_s"] for r in rows if r["format"] == "fp16"), None)
    print(f"\n{label}: context {a.context} x batch {a.batch}, "
          f"{a.threads} thread(s), median of {a.rounds} rounds of {a.steps} steps; "
          f"1-min load average per round {loads} on {os.cpu_count()} CPUs")
    print("| system | KV | decode tok/s | vs transformers | vs EdgeKV fp16 | KV MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = "transformers" if r["system"] == "hf" else "EdgeKV"
        kv = "dynamic fp32" if r["system"] == "hf" else r["format"]
        vs16 = f"{r['tok_s'] / fp16:.2f}x" if fp16 and r["system"] != "hf" else "-"
        print(f"| {name} | {kv} | {r['tok_s']:.2f} | {r['tok_s'] / hf:.2f}x | {vs16} | "
              f"{r['kv_bytes'] / 2**20:,.0f} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "loads": loads,
                                                "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
