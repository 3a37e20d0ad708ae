"""CPU decode attention alone: the compiled kernel (numba) vs the plain-torch path.

Both read the same random paged blocks through ``paged_decode_attention_cpu`` (the
compiled kernel switched off with EDGEKV_CPU_JIT=0 for the torch path), one query per
sequence over its whole history, on one thread unless --threads. The two paths alternate
call by call, so a burst of others' load hits both; the median of --repeats is reported
with ns per stored row read (K and V rows of every sequence and KV head).

    python scripts/bench_cpu_attention.py
    python scripts/bench_cpu_attention.py --formats int8,int4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_cases import random_paged_kv  # noqa: E402

from edgekv.kernels import cpu_compiled  # noqa: E402
from edgekv.kernels.cpu_decode import paged_decode_attention_cpu  # noqa: E402
from edgekv.quant import get_format  # noqa: E402

# (sequences, KV heads, query heads per KV head, head_dim, context): the demo model at
# batch 1 and 16; a KV-heavy shape at 4 x 4K; Qwen2.5-0.5B's heads at 8 x 8K
CASES = [(1, 2, 4, 128, 150), (16, 2, 4, 128, 150), (4, 8, 1, 64, 4096),
         (8, 2, 7, 64, 8192)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="fp16,int8,int4")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{a.threads} thread(s), median of {a.repeats}, 1-min load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| sequences x context | heads (KV x group) x dim | KV | compiled us | torch us "
          "| speed-up | compiled ns/row |")
    print("|---|---|---|---|---|---|---|")
    for S, hkv, G, D, L in CASES:
        for name in a.formats.split(","):
            fmt = get_format(name)
            k, v, bt = random_paged_kv(fmt, [L] * S, hkv, 16, D, device=torch.device("cpu"))
            q = torch.randn(S, hkv * G, D)
            lens = torch.full((S,), L, dtype=torch.int32)
            times: dict[str, list[float]] = {"1": [], "0": []}
            for i in range(a.repeats + 1):
                for flag in ("1", "0"):
                    os.environ[cpu_compiled.ENV_VAR] = flag
                    t = time.perf_counter()
                    paged_decode_attention_cpu(q, k, v, bt, lens, fmt)
                    if i:  # the first call of each warms up (and compiles)
                        times[flag].append(time.perf_counter() - t)
            jit, ref = (statistics.median(times[f]) for f in ("1", "0"))
            rows = S * hkv * L * 2
            print(f"| {S} x {L} | {hkv} x {G} x {D} | {name} | {jit * 1e6:,.0f} | "
                  f"{ref * 1e6:,.0f} | {ref / jit:.1f}x | {jit / rows * 1e9:.1f} |")
    os.environ.pop(cpu_compiled.ENV_VAR, None)


if __name__ == "__main__":
    main()
