"""Round-trip error and byte cost of every KV format and variant, on key-like data.

K is randn (tokens, heads, head_dim) with two outlier channels (x20 and x12), as real
keys have; V is plain randn. Error is the relative RMS of dequantize(quantize(x)) - x.
Also reports the attention-output error of one decode query over the round-tripped K/V,
which is what a user feels. This is the measurement behind the int8/int4 defaults.

    python scripts/bench_formats.py [--tokens 4096] [--heads 8] [--head-dim 128] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch

from edgekv.quant import FORMATS, VARIANTS, get_format


def rel_rms(y: torch.Tensor, x: torch.Tensor) -> float:
    return ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    k = torch.randn(a.tokens, a.heads, a.head_dim, generator=g)
    k[..., 3] *= 20
    k[..., min(77, a.head_dim - 1)] *= 12
    v = torch.randn(a.tokens, a.heads, a.head_dim, generator=g)
    q = torch.randn(a.heads, a.head_dim, generator=g) * a.head_dim**-0.5

    def attend(kk, vv):  # one query per head over all tokens: (heads, head_dim)
        p = torch.softmax(torch.einsum("hd,thd->ht", q, kk), -1)
        return torch.einsum("ht,thd->hd", p, vv)

    exact = attend(k, v)
    fp16 = get_format("fp16").bytes_per_token(a.heads, a.head_dim)
    rows = []
    print(f"{'format':<12}{'K err':>8}{'V err':>8}{'attn err':>10}{'bytes/tok':>11}{'vs fp16':>9}")
    for name in FORMATS + VARIANTS:
        fmt = get_format(name)
        kh, vh = fmt.dequantize(fmt.quantize(k)), fmt.dequantize(fmt.quantize(v))
        row = {"format": name, "k_rel_rms": rel_rms(kh, k), "v_rel_rms": rel_rms(vh, v),
               "attn_rel_rms": rel_rms(attend(kh, vh), exact),
               "bytes_per_token": fmt.bytes_per_token(a.heads, a.head_dim)}
        row["vs_fp16"] = row["bytes_per_token"] / fp16
        rows.append(row)
        print(f"{name:<12}{row['k_rel_rms']:>8.2%}{row['v_rel_rms']:>8.2%}"
              f"{row['attn_rel_rms']:>10.2%}{row['bytes_per_token']:>11,}{row['vs_fp16']:>8.3f}x")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
