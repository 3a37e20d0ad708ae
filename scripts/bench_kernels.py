"""Benchmark the fused paged-attention kernels per KV format against fp16 and torch SDPA.

    python scripts/bench_kernels.py                       # Llama-3.1-8B-like heads, H200 peak
    python scripts/bench_kernels.py --formats int8,int4 --contexts 4096,32768 --json out.json

Decode: one query per sequence over a paged cache of ``context`` tokens per sequence, for
batches 1/8/32 and contexts 1K..128K (combinations that do not fit in free GPU memory are
skipped). Printed per run: time, effective bandwidth (bytes of KV actually read, codes +
scales + zeros, over time), % of the peak bandwidth (--peak-gbps), speedup over the same
kernel on fp16 blocks, and over ``torch.nn.functional.scaled_dot_product_attention`` on
dense fp16 K/V of the same shape (GQA). Prefill: causal attention of fresh prompts of
1K..8K tokens, time, TFLOP/s, and the ratio of quantized to fp16 prefill time.

Timing is ``triton.testing.do_bench`` (CUDA events, median), launcher overhead included
(checks, the query's and output's Hadamard rotation for rotating formats). Cache contents
are random codes and scales: the kernels' speed does not depend on the values.
Needs CUDA; without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import torch

from edgekv.quant import FORMATS, QuantizedKV, get_format

DEFAULT_FORMATS = [f for f in FORMATS if f != "fp32"]  # fp32 is the tests' reference


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--contexts", default="1024,4096,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill-chunks", default="1024,2048,4096,8192")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--peak-gbps", type=float, default=4800.0, help="H200: 4800")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--json", metavar="OUT", help="also write every result row here")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check this script's logic on CPU under TRITON_INTERPRET=1 with tiny "
                         "shapes; the timings mean nothing")
    return ap.parse_args(argv)


# ---- inputs ------------------------------------------------------------------------------
def random_store(fmt, num_blocks: int, hkv: int, B: int, D: int, dev) -> QuantizedKV:
    """Random codes and plausible scales/zeros in the cache layout (no NaN fp8 codes)."""
    shape = (num_blocks, hkv, B, fmt.packed_dim(D))
    if fmt.storage_dtype.is_floating_point:
        data = torch.randn(shape, device=dev, dtype=fmt.storage_dtype)
    else:
        data = torch.randint(0, 256, shape, device=dev, dtype=torch.uint8)
        if fmt.name.startswith("fp8"):
            data &= 0xBB  # clears an exponent bit: never a NaN / inf code
        data = data.view(fmt.storage_dtype)
    groups = (num_blocks, hkv, B, fmt.num_groups(D))
    scale = (torch.rand(groups, device=dev) * 0.01 + 0.01).half() if fmt.has_scale else None
    zero = (torch.rand(groups, device=dev) - 1.0).half() if fmt.has_zero else None
    return QuantizedKV(data, scale, zero)


def paged_inputs(fmt, S: int, L: int, a, dev):
    nb_seq = -(-L // a.block_size)
    num_blocks = S * nb_seq
    k = random_store(fmt, num_blocks, a.kv_heads, a.block_size, a.head_dim, dev)
    v = random_store(fmt, num_blocks, a.kv_heads, a.block_size, a.head_dim, dev)
    tables = torch.randperm(num_blocks, device=dev).to(torch.int32).view(S, nb_seq)
    lens = torch.full((S,), L, dtype=torch.int32, device=dev)
    return k, v, tables, lens


def fits(nbytes: int, dev) -> bool:
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(dev)
    return nbytes < 0.8 * free


def bench(fn, dev) -> float:
    """Median milliseconds per call."""
    if dev.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


# ---- decode ------------------------------------------------------------------------------
def run_decode(a, dev, formats, emit):
    from edgekv.kernels.paged_decode import paged_decode_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    Hq, Hkv, D = a.q_heads, a.kv_heads, a.head_dim
    for S in [int(x) for x in a.batches.split(",")]:
        for L in [int(x) for x in a.contexts.split(",")]:
            dense_bytes = 2 * S * L * Hkv * D * 2  # K + V, fp16
            if not fits(2 * dense_bytes, dev):
                print(f"skip decode batch {S} context {L}: does not fit in GPU memory")
                continue
            q = torch.randn(S, Hq, D, device=dev, dtype=torch.float16)
            kd = torch.randn(S, Hkv, L, D, device=dev, dtype=torch.float16)
            vd = torch.randn_like(kd)
            t_sdpa = bench(functools.partial(sdpa, q[:, :, None], kd, vd, enable_gqa=True), dev)
            del kd, vd
            emit(dict(phase="decode", format="sdpa_dense_fp16", batch=S, context=L,
                      ms=t_sdpa, bytes=dense_bytes))
            t_fp16 = None
            for name in ["fp16"] + [f for f in formats if f != "fp16"]:
                fmt = get_format(name)
                kv_bytes = S * L * fmt.bytes_per_token(Hkv, D)  # codes + scales, K and V
                if not fits(kv_bytes, dev):
                    print(f"skip decode {name} batch {S} context {L}: does not fit")
                    continue
                k, v, bt, sl = paged_inputs(fmt, S, L, a, dev)
                ms = bench(functools.partial(paged_decode_attention, q, k, v, bt, sl, fmt,
                                             max_seq_len=L), dev)
                del k, v
                t_fp16 = ms if name == "fp16" else t_fp16
                if name in formats:
                    emit(dict(phase="decode", format=name, batch=S, context=L, ms=ms,
                              bytes=kv_bytes, vs_fp16_paged=(t_fp16 or math.nan) / ms,
                              vs_sdpa=t_sdpa / ms))


# ---- prefill -----------------------------------------------------------------------------
def run_prefill(a, dev, formats, emit):
    from edgekv.kernels.paged_prefill import paged_prefill_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    Hq, Hkv, D = a.q_heads, a.kv_heads, a.head_dim
    for n in [int(x) for x in a.prefill_chunks.split(",")]:
        flops = 4 * Hq * D * n * (n + 1) / 2  # causal QK^T and PV
        q = torch.randn(n, Hq, D, device=dev, dtype=torch.float16)
        kd = torch.randn(1, Hkv, n, D, device=dev, dtype=torch.float16)
        vd = torch.randn_like(kd)
        qd = q.transpose(0, 1)[None]  # (1, Hq, n, D)
        t_sdpa = bench(functools.partial(sdpa, qd, kd, vd, is_causal=True, enable_gqa=True), dev)
        emit(dict(phase="prefill", format="sdpa_dense_fp16", batch=1, context=n, ms=t_sdpa,
                  tflops=flops / t_sdpa / 1e9))
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        t_fp16 = None
        for name in ["fp16"] + [f for f in formats if f != "fp16"]:
            fmt = get_format(name)
            k, v, bt, sl = paged_inputs(fmt, 1, n, a, dev)
            ms = bench(functools.partial(paged_prefill_attention, q, k, v, bt, sl, cu, fmt,
                                         max_q_len=n), dev)
            t_fp16 = ms if name == "fp16" else t_fp16
            if name in formats:
                emit(dict(phase="prefill", format=name, batch=1, context=n, ms=ms,
                          tflops=flops / ms / 1e9, time_vs_fp16=ms / (t_fp16 or math.nan),
                          vs_sdpa=t_sdpa / ms))


# ---- report ------------------------------------------------------------------------------
def make_emitter(peak_gbps: float, rows: list):
    def emit(r: dict) -> None:
        if "bytes" in r:
            r["gbps"] = r["bytes"] / r["ms"] / 1e6
            r["pct_peak"] = 100 * r["gbps"] / peak_gbps
        rows.append(r)
        line = (f"{r['phase']:7s} {r['format']:16s} batch {r['batch']:>3} "
                f"ctx {r['context']:>7}  {r['ms'] * 1e3:10.1f} us")
        if "gbps" in r:
            line += f"  {r['gbps']:7.0f} GB/s  {r['pct_peak']:5.1f}% peak"
        if "tflops" in r:
            line += f"  {r['tflops']:7.1f} TFLOP/s"
        if "vs_fp16_paged" in r:
            line += f"  x{r['vs_fp16_paged']:.2f} vs fp16 paged"
        if "time_vs_fp16" in r:
            line += f"  time/fp16 {r['time_vs_fp16']:.2f}"
        if "vs_sdpa" in r:
            line += f"  x{r['vs_sdpa']:.2f} vs SDPA"
        print(line, flush=True)
    return emit


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cpu_smoke:
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.contexts, a.batches, a.prefill_chunks = "40", "2", "24"
        a.q_heads, a.kv_heads, a.head_dim = 4, 2, 32
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing to measure (the kernels need a GPU).")
        return 0
    else:
        dev = torch.device("cuda")
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    for f in formats:
        get_format(f)  # unknown names fail before any work
    rows: list = []
    emit = make_emitter(a.peak_gbps, rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; Hq={a.q_heads} Hkv={a.kv_heads} D={a.head_dim} "
          f"block={a.block_size}; peak {a.peak_gbps:.0f} GB/s")
    torch.manual_seed(0)
    run_decode(a, dev, formats, emit)
    if not a.no_prefill:
        run_prefill(a, dev, formats, emit)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
