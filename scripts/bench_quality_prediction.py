"""Predicted against measured KL of KV storage choices on the bundled demo model.

Predicted: the quality model the budget controller decides by (edgekv/auto/quality.py),
from the demo model's probe (its first 512 held-out tokens), averaged over histories
1 .. window as a window read from its start sees them. Measured: KL(fp16 || choice) of
the next-token distributions over held-out windows, every token reading its history
through the cache as decode does (``LLM.score`` in chunks of 8 tokens; tiers age after
every chunk).

    python scripts/bench_quality_prediction.py [--windows 2] [--start 1024]
                                               [--rows int4 int8:192,int4 ...]

Rows: ``int4`` (a format), ``int4+w128`` (the newest 128 also exact), ``int8:192,int4``
(age tiers; ``fp16:N,...`` an exact window first).
"""

from __future__ import annotations

import argparse
import time

import torch

from edgekv import LLM
from edgekv.auto.quality import measure_demo, tier_bands, uniform_bands
from edgekv.llm import DEMO_MODEL_DIR
from edgekv.tiers import parse_tiers

ROWS = ("int8", "int4_nl", "int4", "int4+w128", "int4_nl+w128", "int8:192,int4",
        "int8:128,int4_nl", "fp16:64,int8:256,int4", "fp16:96,int8:128,int4",
        "fp16:32,int8:128,int4_nl")
WINDOW = 1024


def configure(row: str) -> tuple[dict, list]:
    """(LLM keyword arguments, the quality model's bands) of a row."""
    if "+w" in row or "+r" in row:  # +r: the label before the exact window's rename
        fmt, r = row.replace("+r", "+w").split("+w")
        return dict(kv_format=fmt, exact_window=int(r)), uniform_bands(fmt, int(r))
    if ":" in row:
        s = parse_tiers(row)
        return (dict(kv_tiers=row, max_num_batched_tokens=64),
                tier_bands(s.exact, s.formats, s.tokens, 16))
    return dict(kv_format=row), uniform_bands(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--start", type=int, default=1024,
                    help="first held-out token measured (the probe reads tokens 0-511)")
    args = ap.parse_args()
    t0 = time.time()
    quality = measure_demo()
    kw = dict(kv_memory="8MiB", dtype="float32")
    ref = LLM(None, kv_format="fp16", **kw)
    ids = ref.encode((DEMO_MODEL_DIR / "heldout.txt").read_text())
    windows = [ids[args.start + w * WINDOW: args.start + (w + 1) * WINDOW]
               for w in range(args.windows)]
    want = [torch.log_softmax(ref.score(w).double(), -1) for w in windows]
    print("| row | predicted KL | measured KL | predicted / measured |")
    print("|---|---:|---:|---:|")
    for row in args.rows:
        opts, bands = configure(row)
        llm = LLM(None, **opts, **kw)
        kls = []
        for w, r in zip(windows, want, strict=True):
            got = torch.log_softmax(llm.score(w, chunk_size=8).double(), -1)
            kls.append((r.exp() * (r - got)).sum(-1).mean().item())
        measured = sum(kls) / len(kls)
        predicted = quality.mean([bands], WINDOW)
        print(f"| {row} | {predicted:.2e} | {measured:.2e} | {predicted / measured:.2f} |")
    print(f"\n({args.windows} windows of {WINDOW} from held-out token {args.start}; "
          f"{time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
