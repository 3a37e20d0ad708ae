"""Where a CPU decode step goes: EdgeKV vs transformers on the bundled demo model.

Loads the demo model once per system (fp32 weights, one torch thread), then, interleaved
and repeated, times decode side by side:
  - edgekv      ``LLM.generate`` of N+1 new tokens minus that of 1 new token (prefill and
                the first token cancel out), per KV format;
  - hf          transformers ``model.generate`` (DynamicCache, use_cache=True) the same way.
Prompts are ``--prompt-len`` random token ids, all the same length (no padding), EOS ignored.
Reports median decode tok/s (aggregate over the batch) and the ratio to transformers, then
one profiled decode step per system: aten ops dispatched and the top ops by self CPU time.

    python scripts/profile_decode.py                         # int8, batch 1 and 16
    python scripts/profile_decode.py --formats fp16,int8,int4 --repeats 7 --top 15
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


class EdgeKV:
    def __init__(self, fmt: str):
        from edgekv import LLM, SamplingParams

        self.name = f"edgekv {fmt}"
        self.llm = LLM(dtype="float32", kv_format=fmt, kv_memory="64MiB", max_num_seqs=64)
        self.params = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def generate(self, prompts: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        self.llm.generate(prompts, self.params(n))
        return time.perf_counter() - t

    def profile_step(self, prompts: list[list[int]]) -> torch.profiler.profile:
        eng = self.llm.engine
        seqs = self.llm._sequences(prompts, self.params(8))
        for s in seqs:
            eng.add(s)
        eng.step()  # prefill + first token
        eng.step()  # one decode step to warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            eng.step()
        while eng.has_unfinished():
            eng.step()
        return prof


class Transformers:
    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.name = "transformers"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 1
        self.model.generation_config.stop_strings = None

    def _ids(self, prompts):
        ids = torch.tensor(prompts)
        return ids, torch.ones_like(ids)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> float:
        ids, mask = self._ids(prompts)
        t = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, use_cache=True)
        return time.perf_counter() - t

    @torch.inference_mode()
    def profile_step(self, prompts: list[list[int]]) -> torch.profiler.profile:
        from transformers import DynamicCache

        ids, _ = self._ids(prompts)
        cache = DynamicCache()
        out = self.model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        out = self.model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = self.model(nxt, past_key_values=cache, use_cache=True)
            out.logits[:, -1:].argmax(-1)
        return prof


def _op_count(prof) -> int:
    """aten ops called from Python (not from inside another aten op): dispatches."""
    def top(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and top(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int8")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=0, help="print the top ops of each profile")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from edgekv.llm import DEMO_MODEL_DIR

    systems = [] if args.no_hf else [Transformers(DEMO_MODEL_DIR)]
    systems += [EdgeKV(f) for f in args.formats.split(",")]
    vocab = 4096
    n = args.new_tokens
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), threads={args.threads}")
    for batch in map(int, args.batches.split(",")):
        prompts = _prompts(batch, args.prompt_len, vocab, seed=batch)
        for s in systems:  # warm up
            s.generate(prompts, 2)
        times = {s.name: [] for s in systems}
        for _ in range(args.repeats):  # interleaved
            for s in systems:
                full, first = s.generate(prompts, n + 1), s.generate(prompts, 1)
                times[s.name].append(batch * n / max(full - first, 1e-9))
        base = statistics.median(times["transformers"]) if "transformers" in times else None
        for s in systems:
            tps = statistics.median(times[s.name])
            ratio = f"{tps / base:5.2f}x" if base else "  -  "
            prof = s.profile_step(prompts)
            print(f"batch {batch:3d}  {s.name:14s} {tps:9.1f} tok/s  {ratio}  "
                  f"{_op_count(prof):5d} aten ops/step  (runs: "
                  + ", ".join(f"{t:.0f}" for t in times[s.name]) + ")")
            if args.top:
                print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                row_limit=args.top))
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
