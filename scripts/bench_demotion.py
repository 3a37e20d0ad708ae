"""What demoting a KV block costs: re-quantizing its stored codes into a cheaper format
(int8 -> int4, as an age tier would) against quantizing the original values once.

For each (from, to) pair, the relative squared error of the round trip in the storage
basis, sum |x_hat - x|^2 / sum |x|^2:

    once      to(x)                 what a cache written in ``to`` from the start stores
    demoted   to(decode(from(x)))   what a block demoted from ``from`` stores

on the demo model's keys and values (4 windows of its held-out text, every layer) and on
synthetic keys with two outlier channels (x20, x12, as scripts/bench_formats.py).

    python scripts/bench_demotion.py [--pairs int8:int4,int8:int4_nl,...] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch
from fit_codebook import demo_kv

from edgekv.quant import get_format

PAIRS = "int8:int4,int8:int4_nl,int8:int4_g32,fp8:int4,int4_g32:int4"


def rel_sq(y: torch.Tensor, x: torch.Tensor) -> float:
    return ((y - x).square().sum() / x.square().sum()).item()


def errors(src: str, dst: str, x: torch.Tensor) -> tuple[float, float]:
    """(once, demoted) errors of ``x`` (N, head_dim) in ``dst``'s storage basis."""
    a, b = get_format(src), get_format(dst)
    xs = b.to_storage_basis(x.float())
    once = b.decode(b.quantize_storage(xs))
    mid = a.from_storage_basis(a.decode(a.quantize_storage(a.to_storage_basis(x.float()))))
    demoted = b.decode(b.quantize_storage(b.to_storage_basis(mid)))
    return rel_sq(once, xs), rel_sq(demoted, xs)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default=PAIRS, help="comma-separated from:to formats")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(4096 * 8, 128, generator=g)
    keys[:, 3] *= 20
    keys[:, 77] *= 12
    data = {"synthetic keys": keys}
    demo = demo_kv()
    if demo is not None:
        data = {"demo model K/V": demo, **data}
    rows = []
    print(f"{'data':>16} {'from':>9} {'to':>9} {'once':>10} {'demoted':>10} {'cost':>8}")
    for name, x in data.items():
        for pair in a.pairs.split(","):
            src, dst = pair.split(":")
            once, demoted = errors(src, dst, x)
            rows.append({"data": name, "from": src, "to": dst, "once": once,
                         "demoted": demoted, "cost": demoted / once - 1})
            print(f"{name:>16} {src:>9} {dst:>9} {once:10.5f} {demoted:10.5f} "
                  f"{demoted / once - 1:+7.1%}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
