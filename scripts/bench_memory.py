"""KV memory: bytes per token of every format, and paged vs contiguous allocation.

Part 1 prints the exact KV bytes per token (all layers, scales included) of every format
for a model shape, and the ratio to fp16.

Part 2 replays one synthetic trace of requests (mixed prompt and output lengths, all
waiting at the start) through two allocators holding the same KV budget:
  - paged: EdgeKV's BlockManager, blocks taken on demand as tokens arrive; when a decode
    step finds no free block, the most recently admitted request is preempted (its blocks
    freed, recomputed later);
  - contiguous: every admitted request reserves ``--max-len`` tokens up front (what a
    framework without paging must do to never run out mid-sequence).
Both are stepped together: one decode token per running request per step. It prints the
utilisation (live tokens / reserved tokens, over all steps), the mean and peak number of
concurrent requests, and the steps to finish the trace.

    python scripts/bench_memory.py                       # Llama-3.1-8B and the tiny shape
    python scripts/bench_memory.py --kv-memory 2GiB --requests 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass

from edgekv import BlockManager, CacheConfig, parse_memory
from edgekv.quant import FORMATS, get_format

SHAPES = {  # name: (layers, kv_heads, head_dim)
    "llama-3.1-8b": (32, 8, 128),
    "tiny": (4, 2, 128),  # the bundled demo model's shape
}


@dataclass
class Request:
    rid: int
    prompt: int
    output: int
    generated: int = 0

    @property
    def length(self) -> int:
        return self.prompt + self.generated


def make_trace(n: int, max_len: int, seed: int) -> list[Request]:
    """Log-uniform prompt (16..max_len/2) and output (8..max_len/4) lengths."""
    rng = random.Random(seed)

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(lo * (hi / lo) ** rng.random()))

    return [Request(i, log_uniform(16, max_len // 2), log_uniform(8, max_len // 4))
            for i in range(n)]


def run_paged(trace: list[Request], num_blocks: int, block_size: int) -> dict:
    m = BlockManager(num_blocks, block_size)
    waiting = [Request(r.rid, r.prompt, r.output) for r in trace]
    running: list[Request] = []
    live = reserved = conc = peak = steps = preemptions = 0
    done: list[int] = []
    while waiting or running:
        # admit in order while the prompt (and its first output token) fits
        while waiting and m.can_append(waiting[0].rid, waiting[0].length + 1):
            r = waiting.pop(0)
            m.append_slots(r.rid, r.length)
            running.append(r)
        assert running, "a single request does not fit the budget"
        for r in list(running):  # one decode token each; preempt the newest when short
            if r not in running:
                continue
            while not m.can_append(r.rid, 1):
                victim = running.pop()
                m.free(victim.rid)
                waiting.insert(0, victim)  # recomputed from its prompt + output so far
                preemptions += 1
                if victim is r:
                    break
            if r not in running:
                continue
            m.append_slots(r.rid, 1)
            r.generated += 1
            if r.generated >= r.output:
                running.remove(r)
                m.free(r.rid)
                done.append(r.rid)
        steps += 1
        live += sum(t.num_tokens for t in m.tables.values())
        reserved += m.pool.num_used * block_size
        conc += len(m.tables)
        peak = max(peak, len(m.tables))
        if steps % 256 == 0:
            m.check_integrity()
    m.check_integrity()
    assert m.pool.num_free == num_blocks, "blocks leaked"
    return {"utilization": live / reserved, "mean_concurrent": conc / steps,
            "peak_concurrent": peak, "steps": steps, "preemptions": preemptions,
            "completed": sorted(done)}


def run_contiguous(trace: list[Request], slots: int, max_len: int) -> dict:
    waiting = [Request(r.rid, r.prompt, r.output) for r in trace]
    running: list[Request] = []
    live = reserved = conc = peak = steps = 0
    done: list[int] = []
    while waiting or running:
        while waiting and len(running) < slots:
            running.append(waiting.pop(0))
        for r in list(running):
            r.generated += 1
            if r.generated >= r.output:
                running.remove(r)
                done.append(r.rid)
        steps += 1
        live += sum(r.length for r in running)
        reserved += len(running) * max_len
        conc += len(running)
        peak = max(peak, len(running))
    return {"utilization": live / reserved if reserved else 0.0,
            "mean_concurrent": conc / steps, "peak_concurrent": peak, "steps": steps,
            "preemptions": 0, "completed": sorted(done)}


def bytes_table(shape: str) -> list[dict]:
    layers, heads, dim = SHAPES[shape]
    fp16 = layers * get_format("fp16").bytes_per_token(heads, dim)
    rows = []
    for name in FORMATS:
        b = layers * get_format(name).bytes_per_token(heads, dim)
        rows.append({"shape": shape, "format": name, "bytes_per_token": b,
                     "vs_fp16": b / fp16})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    p.add_argument("--kv-memory", default=None,
                   help="KV budget for the trace (default: 4GiB for llama-3.1-8b, 64MiB tiny)")
    p.add_argument("--formats", default="fp16,int8,int4")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-len", type=int, default=4096, help="contiguous reservation")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    shapes = list(SHAPES) if a.shape == "all" else [a.shape]
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    for f in formats:
        get_format(f)
    result = {"bytes": [], "trace": []}

    print(f"{'shape':<14}{'format':<10}{'bytes/token':>13}{'vs fp16':>9}")
    for shape in shapes:
        for row in bytes_table(shape):
            result["bytes"].append(row)
            print(f"{shape:<14}{row['format']:<10}{row['bytes_per_token']:>13,}"
                  f"{row['vs_fp16']:>8.3f}x")

    trace = make_trace(a.requests, a.max_len, a.seed)
    mean_len = sum(r.prompt + r.output for r in trace) / len(trace)
    print(f"\ntrace: {a.requests} requests, mean final length {mean_len:.0f} tokens, "
          f"contiguous reservation {a.max_len}, block size {a.block_size}, seed {a.seed}")
    print(f"{'shape':<14}{'format':<8}{'budget':>10}{'allocator':>12}{'util':>8}"
          f"{'mean conc':>11}{'peak':>6}{'steps':>7}{'preempt':>9}")
    for shape in shapes:
        layers, heads, dim = SHAPES[shape]
        budget = parse_memory(a.kv_memory or ("4GiB" if shape == "llama-3.1-8b" else "64MiB"))
        for f in formats:
            cfg = CacheConfig.for_budget(budget, layers, heads, dim, a.block_size, f)
            slots = budget // (a.max_len * cfg.bytes_per_token)
            runs = {"paged": run_paged(trace, cfg.num_blocks, a.block_size)}
            runs["contiguous"] = run_contiguous(trace, slots, a.max_len) if slots else None
            for alloc, r in runs.items():
                if r is None:
                    print(f"{shape:<14}{f:<8}{budget / 2**20:>8.0f}Mi{alloc:>12}  "
                          f"fits no request of {a.max_len} tokens")
                    continue
                assert r.pop("completed") == list(range(len(trace)))
                result["trace"].append({"shape": shape, "format": f, "budget_bytes": budget,
                                        "allocator": alloc, **r})
                print(f"{shape:<14}{f:<8}{budget / 2**20:>8.0f}Mi{alloc:>12}"
                      f"{r['utilization']:>8.1%}{r['mean_concurrent']:>11.1f}"
                      f"{r['peak_concurrent']:>6}{r['steps']:>7}{r['preemptions']:>9}")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
