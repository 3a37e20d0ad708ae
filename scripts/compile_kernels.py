"""Compile every EdgeKV Triton kernel for CUDA targets, without a GPU, and report resources.

    python scripts/compile_kernels.py --arch 80,86,90 --formats int8,int4 --head-dim 128

Each launcher is called on small CPU tensors with its kernels swapped for recorders; each
recorded launch (its argument types and compile-time constants) is compiled ahead of time
for each architecture with ``triton.compile``. Printed per kernel: registers per thread,
stack bytes (register spills), shared memory. Exit status 1 if any kernel fails to compile
(a GPU-only error the CPU interpreter cannot show), 0 otherwise. Needs Triton's NVIDIA
backend (bundled with the Linux wheels); the interpreter must be off, so this script
removes TRITON_INTERPRET from its own environment before importing Triton.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from edgekv.quant import FORMATS, VARIANTS, QuantizedKV, get_format  # noqa: E402

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
       torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append((self.fn, args, kw))
        return launch


def _signature(fn, args, kw):
    vals = dict(zip(fn.arg_names, args, strict=False)) | kw
    sig, const = {}, {}
    for p in fn.params:
        v = vals[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    return sig, const, opts


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1):>3}  stack {m.group(2):>4} B" if m else "regs ?"


def record_launches(fmt_name: str, head_dim: int) -> list:
    """Call every launcher once (decode direct and split + mass, prefill, write)."""
    import edgekv.kernels.kv_tiles as kt
    import edgekv.kernels.launch as lc
    import edgekv.kernels.lse_merge as lm
    import edgekv.kernels.paged_decode as pd
    import edgekv.kernels.paged_prefill as pp
    import edgekv.kernels.quant_write as qw

    launches: list = []
    for mod, name in ((pd, "_paged_decode_kernel"), (pp, "_paged_prefill_kernel"),
                      (qw, "_quant_write_kernel"), (lm, "_lse_merge_kernel")):
        kernel = getattr(mod, name)
        kernel = kernel.fn if isinstance(kernel, Recorder) else kernel  # called before
        setattr(mod, name, Recorder(kernel, launches))
    cuda = torch.device("cuda")
    lc.dot_dtype = lambda f, _dev: kt.dot_dtype(f, cuda)  # GPU dot dtypes (attention_launch)

    fmt, hkv, B, D = get_format(fmt_name), 2, 16, head_dim
    shape = (8, hkv, B)
    groups = (*shape, fmt.num_groups(D))
    store = QuantizedKV(torch.zeros(*shape, fmt.packed_dim(D), dtype=fmt.storage_dtype),
                        torch.ones(groups, dtype=fmt.scale_dtype) if fmt.has_scale else None,
                        torch.zeros(groups, dtype=fmt.scale_dtype) if fmt.has_zero else None)
    q = torch.randn(2, hkv * 4, D, dtype=torch.float16)
    bt = torch.arange(8, dtype=torch.int32).view(2, 4)
    sl = torch.tensor([5, 60], dtype=torch.int32)
    pd.paged_decode_attention(q, store, store, bt, sl, fmt, num_splits=1)
    pd.paged_decode_attention(q, store, store, bt, sl, fmt, num_splits=4, return_block_mass=True)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    pp.paged_prefill_attention(torch.randn(9, hkv * 4, D), store, store, bt, sl, cu, fmt)
    qw.quant_write(store, torch.randn(5, hkv, D), torch.arange(5), fmt)
    return launches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,86,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--formats", default=",".join(FORMATS + VARIANTS))
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"Triton's NVIDIA backend is not available: {e}")
        return 1
    archs = [int(a) for a in args.arch.split(",")]
    failed, seen = 0, set()
    for name in args.formats.split(","):
        for fn, a, kw in record_launches(name, args.head_dim):
            sig, const, opts = _signature(fn, a, kw)
            key = (fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in const.items()))
            if key in seen:
                continue
            seen.add(key)
            shown = {k: str(v) for k, v in const.items()
                     if k in ("KIND", "GROUP", "DOT", "PRECISE", "DIRECT", "RETURN_MASS")}
            for arch in archs:
                try:
                    out = triton.compile(ASTSource(fn, sig, const),
                                         target=GPUTarget("cuda", arch, 32), options=opts)
                except Exception as e:  # report every failure, then fail
                    failed += 1
                    print(f"FAIL sm_{arch} {name:10s} {fn.__name__}: {e}")
                    continue
                print(f"ok   sm_{arch} {name:10s} {fn.__name__:22s} {_resources(out.asm['cubin'])}"
                      f"  smem {out.metadata.shared:>6} B  {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
