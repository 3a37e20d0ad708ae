"""Fit the 16 levels of the 4-bit codebook format (quant/codebook.py) and measure them.

Lloyd's algorithm on groups of Gaussian values, the levels kept on a polynomial of the
code (codebook.POLY: a kernel computes a level with five multiply-adds instead of a table
lookup): each group takes the best of the format's candidate scales (a signed multiple of
its extreme value), then the polynomial moves the levels as close as it can to the
scale-weighted means of the normalised values they code. Code 7 is exactly 0 (a zero
vector reads back as zeros). Printed: the levels, and the
round-trip error (squared error / squared value, in the storage basis) of every 4-bit
format on Gaussian vectors, on the demo model's keys and values (the first 4 windows of
its held-out text), and on random vectors with planted outlier channels.

    python scripts/fit_codebook.py                 # ~1 min on one core
    python scripts/fit_codebook.py --group 128
"""

from __future__ import annotations

import argparse

import torch

from edgekv.quant import get_format, unpack_int4
from edgekv.quant.codebook import POLY, ZERO_CODE, CodebookFormat


def fit(group: int, num_groups: int, iters: int, seed: int) -> torch.Tensor:
    """The polynomial's coefficients (codebook.POLY's order) after ``iters`` rounds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_groups, group, generator=g)
    u = torch.arange(16, dtype=torch.float64) - ZERO_CODE
    powers = torch.stack([u ** (i + 1) for i in range(len(POLY))], 1)  # (16, degree)
    coef = torch.tensor(POLY, dtype=torch.float64)
    for _ in range(iters):
        # each group's codes and scale as the format chooses them (its candidate search)
        fmt = CodebookFormat("fit", poly=tuple(coef.tolist()), group_size=group, rotate=False)
        q = fmt.quantize_storage(x)
        s, c = q.scale.float(), unpack_int4(q.data).long()  # (N, 1), (N, group)
        y, w = (x / s).flatten().double(), s.square().expand_as(x).flatten().double()
        c = c.flatten()
        num = torch.zeros(16, dtype=torch.float64).index_add_(0, c, y * w)
        den = torch.zeros(16, dtype=torch.float64).index_add_(0, c, w)
        # Lloyd's step under the constraint: the levels' squared distance to their
        # centroids, weighted by the mass each codes, least in the polynomial's family
        cen = num / den.clamp(min=1e-30)
        sw = den.sqrt().unsqueeze(1)
        coef = torch.linalg.lstsq(powers * sw, (cen.unsqueeze(1) * sw)).solution.squeeze(1)
    return coef


def rel_error(fmt, x: torch.Tensor) -> float:
    xs = fmt.to_storage_basis(x.float())
    return ((fmt.decode(fmt.quantize_storage(xs)) - xs).square().sum()
            / xs.square().sum()).item()


def demo_kv() -> torch.Tensor | None:
    """(N, head_dim) keys and values of the demo model on its held-out text."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgekv.llm import DEMO_MODEL_DIR
        tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the demo model is optional here
        print(f"(demo model unavailable: {e})")
        return None
    ids = tok((DEMO_MODEL_DIR / "heldout.txt").read_text(), return_tensors="pt").input_ids
    rows = []
    with torch.no_grad():
        for i in range(4):
            cache = model(ids[:, i * 1024:(i + 1) * 1024], use_cache=True).past_key_values
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    rows.append(t[0].reshape(-1, t.shape[-1]))
    return torch.cat(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--groups", type=int, default=200_000)
    p.add_argument("--iters", type=int, default=12)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    coef = fit(a.group, a.groups, a.iters, seed=0)
    print("POLY = (" + ", ".join(f"{c:.6e}" for c in coef.tolist()) + ")")
    fitted = CodebookFormat("fitted", poly=tuple(float(f"{c:.6e}") for c in coef.tolist()),
                            group_size=a.group)
    print("levels:", ", ".join(f"{v:.4f}" for v in fitted.levels))
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(20_000, 128, generator=g)
    outl = torch.randn(20_000, 128, generator=g) * 2 + 0.3
    outl[:, 3] *= 8  # a planted outlier key channel, as the kernel tests' data
    sets = {"Gaussian": gauss, "outlier channel": outl}
    kv = demo_kv()
    if kv is not None:
        z = fitted.to_storage_basis(kv)
        z = z / z.square().mean(-1, keepdim=True).sqrt()
        print(f"demo model K and V, rotated: kurtosis {z.pow(4).mean():.2f} (Gaussian: 3)")
        sets["demo model K, V"] = kv
    fmts = [get_format(n) for n in ("int4", "int4_g32", "int4_nl")]
    fmts += [CodebookFormat("codebook, groups of 32, fp16 scales", group_size=32,
                            scale_dtype=torch.float16),
             CodebookFormat("codebook, one fp16 scale per token-head", group_size=None,
                            scale_dtype=torch.float16), fitted]
    print("| format | bytes / 128 values | " + " | ".join(sets) + " |")
    print("|---|---:|" + "---:|" * len(sets))
    for fmt in fmts:
        name = fmt.name
        errs = " | ".join(f"{rel_error(fmt, x):.5f}" for x in sets.values())
        print(f"| {name} | {fmt.bytes_per_token(1, 128) // 2} | {errs} |")


if __name__ == "__main__":
    main()
