"""4-bit storage through a fixed non-uniform codebook, one 8-bit scale per group of values.

After the format's Hadamard rotation a head vector's values are close to Gaussian (measured
on the demo model's keys and values: kurtosis 2.96, a Gaussian's is 3), and a uniform grid
spends its levels evenly where the values are not. Here each value is one of 16 levels
(``levels``, fitted by Lloyd's algorithm to Gaussian groups; scripts/fit_codebook.py),
a polynomial of the code that a kernel evaluates in registers:

    x  ~  s * level(code)           code in [0, 16), s signed e4m3 (fp8), one per group
    level(c) = u (p0 + u (p1 + u (p2 + u (p3 + u p4)))),   u = c - 7   (POLY)

Groups of 16 with a one-byte scale cost what groups of 32 with an fp16 scale do (72 bytes
per 128 values) and err 13 % less (scripts/fit_codebook.py). e4m3 holds scale magnitudes
in [2^-9, 448] (3 significant bits, fewer below 2^-6): a group whose largest value exceeds
~466 clips to it, and groups below ~0.02 lose precision (the demo model's rotated keys and
values: group maxima 0.29 to 7.6).

The scale is chosen per group among candidates, by least squared error (the first on a
tie), in this order: for each f in ``factors`` (``scale_factors``), ``s = e * f`` with
``e`` the group's extreme value (its largest magnitude, with its sign; f = 1 maps it
near the top level, a smaller f clips it to gain resolution for the rest, a negative f
puts it on the bottom level), then that candidate's least-squares refit
``s' = sum(x l) / sum(l l)`` over its codes' levels l. Every candidate is rounded to the
stored dtype (``signed_scale``) before its codes are computed. Codes are the nearest
level to ``x / s`` (``torch.bucketize`` over the midpoints between levels: a value on a
midpoint takes the lower level); they are packed two per byte in the split-halves order
of ``packing.py``.
"""

from __future__ import annotations

import torch

from .base import MIN_SCALE, SCALE_DTYPE, GroupedFormat, QuantizedKV
from .packing import pack_int4, unpack_int4

# The 16 levels: POLY[0] u + POLY[1] u^2 + ... + POLY[4] u^5 at u = code - ZERO_CODE, a
# polynomial so that a kernel decodes a code with five multiply-adds, no table (fitted
# by Lloyd's algorithm to groups of 32 Gaussian values normalised by their signed
# extreme and the best of 16 positive multiples of it (MULTIPLES), with fp16 scales and
# no refit: scripts/fit_codebook.py before the refit). Refitted for this layout
# (``fit_codebook.py --group 16``) they err 1.7 % less on the demo model's keys and
# values, yet its KL rose from 8.60e-4 to 9.44e-4: at this level the KL moves ~10 % with
# small changes of the levels, so these stay.
ZERO_CODE = 7
POLY = (9.442123e-02, -5.268296e-04, 3.134332e-04, -2.400334e-06, 5.125546e-06)
MULTIPLES = tuple(round(0.6 + 0.5 * i / 15, 6) for i in range(16))  # 0.6 .. 1.1
SCALE_DTYPES = {  # stored scale dtype -> magnitude range it is clamped to
    torch.float8_e4m3fn: (2.0**-9, 448.0),  # smallest subnormal, largest finite
    SCALE_DTYPE: (MIN_SCALE, torch.finfo(SCALE_DTYPE).max),
}


class CodebookFormat(GroupedFormat):
    """Codes through the 16 levels of ``poly`` (``levels``, increasing), a signed scale of
    ``scale_dtype`` (e4m3 or fp16) per ``group_size`` values (None: one per token-head),
    optionally rotated."""

    def __init__(self, name: str, poly=POLY, group_size: int | None = 16,
                 rotate: bool = True, factors=None,
                 scale_dtype: torch.dtype = torch.float8_e4m3fn):
        self.name = name
        self.poly = tuple(float(c) for c in poly)
        self.levels = levels_of(self.poly)
        assert list(self.levels) == sorted(self.levels), "the levels must increase"
        self.group_size = group_size
        self.rotate = rotate
        self.factors = tuple(float(f) for f in (factors or scale_factors(self.levels)))
        self.has_scale = True
        self.has_zero = False
        self.signed_scale = True
        assert scale_dtype in SCALE_DTYPES, f"no scale range for {scale_dtype}"
        self.scale_dtype = scale_dtype
        self.storage_dtype = torch.uint8

    def level_tensor(self, device=None) -> torch.Tensor:
        """(16,) fp32 levels."""
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    def midpoints(self, device=None) -> torch.Tensor:
        """(15,) fp32 decision boundaries: code = number of midpoints below x / s."""
        lv = self.level_tensor(device)
        return (lv[1:] + lv[:-1]) * 0.5

    # ---- shape rules -------------------------------------------------------------------
    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even to pack two 4-bit codes "
                             f"per byte, got {head_dim}")

    def packed_dim(self, head_dim: int) -> int:
        self.check_head_dim(head_dim)
        return head_dim // 2

    # ---- quantize / decode (num_groups, the basis, quantize: GroupedFormat) ------------
    def quantize_storage(self, xf: torch.Tensor) -> QuantizedKV:
        d = xf.shape[-1]
        g = self.num_groups(d)
        xg = xf.float().reshape(*xf.shape[:-1], g, d // g)  # (..., groups, group_size)
        lv, mid = self.level_tensor(xf.device), self.midpoints(xf.device)
        ext = xg.gather(-1, xg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (..., groups)
        best_err = best_scale = best_codes = None
        for f in self.factors:
            raw = ext * f
            for _ in range(2):  # the candidate, then its least-squares refit
                scale = signed_scale(raw, self.scale_dtype)  # (..., groups)
                s = scale.float().unsqueeze(-1)
                codes = torch.bucketize(xg / s, mid)  # (..., groups, group_size) int64
                lc = lv[codes]
                err = (xg - lc * s).square().sum(-1)  # (..., groups)
                if best_err is None:
                    best_err, best_scale, best_codes = err, scale, codes
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_scale = torch.where(better, scale, best_scale)
                    best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
                raw = (xg * lc).sum(-1) / (lc * lc).sum(-1).clamp(min=1e-30)
        data = pack_int4(best_codes.reshape(xf.shape).to(torch.uint8))
        return QuantizedKV(data=data, scale=best_scale, zero=None)

    def decode(self, q: QuantizedKV) -> torch.Tensor:
        codes = unpack_int4(q.data).long()  # (..., d)
        x = self.level_tensor(q.data.device)[codes]
        d = x.shape[-1]
        g = q.scale.shape[-1]
        xg = x.reshape(*x.shape[:-1], g, d // g) * q.scale.float().unsqueeze(-1)
        return xg.reshape(x.shape)


def levels_of(poly) -> tuple[float, ...]:
    """The 16 fp32 levels of a polynomial (POLY's order), computed in float64 and
    rounded once: a kernel evaluating it by Horner's rule in fp32 lands within ~2 ulp."""
    u = torch.arange(16, dtype=torch.float64) - ZERO_CODE
    lv = torch.zeros(16, dtype=torch.float64)
    for c in reversed(poly):
        lv = (lv + c) * u
    return tuple(lv.float().tolist())


def scale_factors(levels, multiples=MULTIPLES) -> tuple[float, ...]:
    """The candidate scales' factors of the extreme: each multiple, which maps the extreme
    near the top level (1/m of it), then each multiple flipped and stretched by
    top / -bottom, which maps it as near the bottom level. The levels are asymmetric
    (-0.886 .. 1.040): a group whose largest value of the other sign is nearly as large
    as its extreme fits better with the extreme on the short side (measured on the demo
    model's keys and values: round-trip error -6.6 %; KL 8.60e-4 -> 7.78e-4)."""
    stretch = levels[-1] / -levels[0]
    return tuple(multiples) + tuple(round(-m * stretch, 6) for m in multiples)


def signed_scale(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> ``dtype`` (round to nearest even), keeping the sign, magnitude clamped
    to SCALE_DTYPES[dtype] (a zero group gets the smallest positive scale: its codes are
    the level nearest 0)."""
    lo, hi = SCALE_DTYPES[dtype]
    mag = raw.abs().clamp(min=lo, max=hi)
    return torch.where(raw < 0, -mag, mag).to(dtype)
