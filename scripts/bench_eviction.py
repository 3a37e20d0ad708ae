"""What eviction costs in speed and saves in memory, measured side by side in one run.

The bundled demo model (or --model) generates --new-tokens tokens per prompt, greedily,
EOS ignored, for each policy in --policies (``none`` = no eviction) at a per-sequence
budget of --budget tokens. Reported per configuration:
  tok/s        generated tokens / wall time (fastest of --repeats runs after a warm-up)
  vs none      tok/s over the no-eviction run's at the same batch
  peak KV MiB  the most KV bytes in use after any step (``kv_stats()["bytes_used"]``)
  evicted      tokens evicted during that run
Streaming reads no attention; h2o and snapkv collect per-block attention mass in every
layer of every step, which is what their extra time pays for.

    python scripts/bench_eviction.py                       # demo model, ~1 min on 2 CPUs
    python scripts/bench_eviction.py --batches 1,8 --budget 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgekv import LLM, SamplingParams

MiB = 2**20


def run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, int]:
    """(seconds, peak KV bytes, evicted tokens) of one generate over ``prompts``."""
    eng = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [eng.new_sequence(p, params) for p in prompts]
    evicted = llm.kv_stats().get("evicted_tokens") or 0  # counted since the LLM was made
    peak, start = 0, time.perf_counter()
    for s in seqs:
        eng.add(s)
    while any(not s.finished for s in seqs):
        eng.step()
        peak = max(peak, eng.manager.pool.num_used * llm.cache_config.bytes_per_block)
    seconds = time.perf_counter() - start
    return seconds, peak, (llm.kv_stats().get("evicted_tokens") or 0) - evicted


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF-format model dir (default: the demo)")
    p.add_argument("--kv", default="int8", help="KV format")
    p.add_argument("--policies", default="none,streaming,h2o,snapkv")
    p.add_argument("--budget", type=int, default=128, help="max_kv_tokens per sequence")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        llms = {}
        for pol in a.policies.split(","):
            ev = None if pol == "none" else pol
            llms[pol] = LLM(a.model, kv_format=a.kv, kv_memory="64MiB", dtype=torch.float32,
                            eviction=ev, max_kv_tokens=a.budget if ev else None)
        vocab = next(iter(llms.values())).model_config.vocab_size
        prompts = torch.randint(3, vocab, (batch, a.prompt_len), generator=g).tolist()
        best: dict[str, tuple] = {}
        for llm in llms.values():
            run(llm, prompts, 8)  # warm-up
        for _ in range(a.repeats):  # interleaved, so a noisy moment hits every policy
            for pol, llm in llms.items():
                r = run(llm, prompts, a.new_tokens)
                if pol not in best or r[0] < best[pol][0]:
                    best[pol] = r
        base = batch * a.new_tokens / best[a.policies.split(",")[0]][0]
        for pol, (sec, peak, evicted) in best.items():
            tps = batch * a.new_tokens / sec
            rows.append(dict(policy=pol, batch=batch, budget=a.budget if pol != "none" else None,
                             kv_format=a.kv, new_tokens=a.new_tokens, tok_s=round(tps, 1),
                             vs_none=round(tps / base, 3), peak_kv_mib=round(peak / MiB, 3),
                             evicted=evicted))
    print(f"{'policy':<10}{'batch':>6}{'tok/s':>9}{'vs none':>9}{'peak KV MiB':>13}"
          f"{'evicted':>9}")
    for r in rows:
        print(f"{r['policy']:<10}{r['batch']:>6}{r['tok_s']:>9.1f}{r['vs_none']:>8.2f}x"
              f"{r['peak_kv_mib']:>13.3f}{r['evicted']:>9}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
