"""The compiled CPU path's 16-entry lookup (kernels/cpu_jit_lut.py) in each instruction
set it can emit, against numpy: the codebook format's decode on every CPU."""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from edgekv.kernels import cpu_jit_lut  # noqa: E402


def _supported(mode: str) -> bool:
    feats = cpu_jit_lut.target_features()
    return mode == "scalar" or (mode == "avx2" and "avx2" in feats) or (
        mode == "avx512" and "avx512f" in feats)


@pytest.mark.parametrize("mode", cpu_jit_lut.MODES)
def test_lookup_matches_numpy_in_every_mode(mode):
    if not _supported(mode):
        pytest.skip(f"this CPU cannot run {mode}")
    lut16 = cpu_jit_lut.make_lut16(mode)

    @numba.njit
    def decode(table, row, scales, out):  # every 16 bytes' low then high nibbles
        P = row.shape[0]
        for j in range(0, P, 16):
            lut16(table, row, j, 0, scales[j // 16], out, j)
            lut16(table, row, j, 4, scales[(j + P) // 16], out, j + P)

    rng = np.random.default_rng(0)
    table = rng.standard_normal(20).astype(np.float32)  # entries past 16 are not read
    row = np.concatenate([np.arange(256), rng.integers(0, 256, 64)]).astype(np.uint8)
    scales = rng.standard_normal(2 * row.size // 16).astype(np.float32)
    out = np.full(2 * row.size, np.nan, np.float32)
    decode(table, row, scales, out)
    codes = np.concatenate([row & 15, row >> 4])
    want = table[codes] * np.repeat(scales, 16)
    np.testing.assert_array_equal(out, want)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown lookup mode"):
        cpu_jit_lut.make_lut16("neon")
