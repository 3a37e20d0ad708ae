"""How long kv_format="auto" takes to probe a model once (later loads read it back).

A random-weight model of a real model's shape (scripts/bench_long_decode.py SHAPES) is
probed on random token ids: one prefill with every layer fp16, then one per layer and
candidate format, each started at the layer it changes. Prints the probe's wall time, the
prefills it ran, a load that reads the stored probe, and a plain load, side by side.

    python scripts/bench_auto_probe.py [--shape qwen2.5-0.5b] [--tokens 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_decode import SHAPES  # noqa: E402
from bench_throughput import build_random_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--tokens", type=int, default=1024,
                   help="calibration ids given (the probe reads at most 512 on a CPU)")
    p.add_argument("--bits", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from edgekv import LLM

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGEKV_AUTO_DIR"] = str(Path(tmp) / "auto")
        shape = dict(SHAPES[a.shape])
        model = build_random_model(Path(tmp) / "m", shape.pop("family"), **shape)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, shape["vocab_size"], (a.tokens,), generator=g).tolist()
        kw = dict(kv_memory="64MiB", dtype="float32", kv_calibration=ids)
        times, llm = {}, None
        for what, fmt in (("plain load (int8)", "int8"), ("load + probe", f"auto:{a.bits}"),
                          ("load, stored probe", f"auto:{a.bits}")):
            del llm  # one model in memory at a time
            gc.collect()
            t = time.perf_counter()
            llm = LLM(model, kv_format=fmt, **kw)
            times[what] = time.perf_counter() - t
            print(f"{what:>20}: {times[what]:7.1f} s")
        mc = llm.model_config
        prefills = 1 + mc.num_layers * (len(llm.kv_probe.formats) - 1)
        values = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim
        print(f"{a.shape}: {prefills} prefills of {llm.kv_probe.tokens} tokens, "
              f"{torch.get_num_threads()} threads; chose {llm.kv_auto.summary(values)}")
    return times


if __name__ == "__main__":
    main()
