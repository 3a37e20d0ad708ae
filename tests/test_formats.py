"""KV formats: round-trip error bounds, exact byte costs, rounding, packing, bad input."""

import pytest
import torch

from edgekv.quant import FORMATS, VARIANTS, get_format, pack_int4, unpack_int4
from edgekv.quant.hadamard import hadamard_matrix

# Floors from the foundation issue; the measured values sit well below (README table).
MAX_REL_RMS = {"fp32": 1e-7, "fp16": 1e-3, "bf16": 5e-3, "int8": 0.025, "fp8": 0.06,
               "fp8_e5m2": 0.12, "int4": 0.15}


def outlier_kv(tokens=512, heads=8, dim=128, seed=0):
    """randn K with two outlier channels (x20, x12) as real keys have, and plain randn V."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, dim, generator=g)
    k[..., 3] *= 20
    k[..., 77] *= 12
    v = torch.randn(tokens, heads, dim, generator=g)
    return k, v


def rel_rms(fmt, x):
    y = fmt.dequantize(fmt.quantize(x))
    assert y.shape == x.shape and y.dtype == torch.float32
    return ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


@pytest.mark.parametrize("name", list(MAX_REL_RMS))
def test_round_trip_error_within_floor(name):
    fmt = get_format(name)
    k, v = outlier_kv()
    assert rel_rms(fmt, k) <= MAX_REL_RMS[name]
    assert rel_rms(fmt, v) <= MAX_REL_RMS[name]


def test_rotation_beats_plain_per_token_scale_for_int4():
    k, _ = outlier_kv()
    plain, rotated = rel_rms(get_format("int4_norot"), k), rel_rms(get_format("int4"), k)
    assert plain > 0.18  # the gap the issue describes (~21%)
    assert rotated < plain / 2


@pytest.mark.parametrize("name", FORMATS + VARIANTS)
@pytest.mark.parametrize("fill", [0.0, 3.5, -1e-3])
def test_zero_and_constant_vectors_round_trip_without_nan(name, fill):
    fmt = get_format(name)
    x = torch.full((4, 2, 64), fill)
    y = fmt.dequantize(fmt.quantize(x))
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x, atol=abs(fill) * 0.07 + 1e-6)


@pytest.mark.parametrize("name", FORMATS + VARIANTS)
def test_quantize_keeps_leading_shape_and_does_not_modify_input(name):
    fmt = get_format(name)
    x = torch.randn(3, 5, 2, 64)
    before = x.clone()
    q = fmt.quantize(x)
    assert torch.equal(x, before)
    assert q.data.shape == (3, 5, 2, fmt.packed_dim(64))
    assert q.data.dtype == fmt.storage_dtype
    if fmt.has_scale:
        assert q.scale.shape == (3, 5, 2, fmt.num_groups(64))
        assert q.scale.dtype == fmt.scale_dtype
    assert (q.zero is not None) == fmt.has_zero


@pytest.mark.parametrize("name", FORMATS + VARIANTS)
def test_bytes_per_token_is_the_stored_size(name):
    fmt = get_format(name)
    q = fmt.quantize(torch.randn(1, 8, 128))
    stored = sum(t.numel() * t.element_size() for t in (q.data, q.scale, q.zero)
                 if t is not None)
    assert fmt.bytes_per_token(8, 128) == 2 * stored  # K and V


def test_bytes_per_token_ratios_against_fp16():
    fp16 = get_format("fp16").bytes_per_token(8, 128)
    assert fp16 == 2 * 8 * 128 * 2
    assert get_format("int8").bytes_per_token(8, 128) <= 0.52 * fp16
    assert get_format("fp8").bytes_per_token(8, 128) <= 0.52 * fp16
    assert get_format("int4").bytes_per_token(8, 128) <= 0.28 * fp16


def test_int8_rounds_to_nearest_not_truncates():
    fmt = get_format("int8_norot")
    x = torch.tensor([[127.0, 0.6, -0.6, 1.49, -1.51, 2.5]])  # scale = 1.0 exactly
    q = fmt.quantize(x)
    assert q.scale.item() == 1.0
    assert q.data.tolist() == [[127, 1, -1, 1, -2, 2]]  # ties to even: 2.5 -> 2


def test_int4_codes_use_the_documented_split_halves_order():
    fmt = get_format("int4_norot")  # asymmetric: min -> code 0, max -> code 15
    x = torch.zeros(1, 8)
    x[0, 0], x[0, 4] = 15.0, 0.0  # scale 1, zero 0
    x[0, 1], x[0, 5] = 3.0, 7.0
    q = fmt.quantize(x)
    assert q.data.tolist() == [[15 | 0 << 4, 3 | 7 << 4, 0, 0]]


def test_pack_unpack_int4_inverse():
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 3, 32)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[..., 0] & 0xF, codes[..., 0])
    assert torch.equal(packed[..., 0] >> 4, codes[..., 32])


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_clamps_to_finite_range(name):
    fmt = get_format(name)
    x = torch.tensor([[1e30, -1e30, 1.0, 0.0]])
    y = fmt.dequantize(fmt.quantize(x))
    assert torch.isfinite(y).all()
    # the scale saturates at fp16's max, and the codes at the format's largest finite value
    assert y[0, 0].item() == pytest.approx(65504 * fmt.fmax) and y[0, 1] == -y[0, 0]
    # 449 / 448 rounds down in fp16, so 449 / scale > 448: clamped before the cast, not NaN
    assert torch.isfinite(fmt.dequantize(fmt.quantize(torch.tensor([[449.0, 1.0]])))).all()


def test_fp16_clamps_instead_of_overflowing():
    y = get_format("fp16").dequantize(get_format("fp16").quantize(torch.tensor([[1e6, -1e6]])))
    assert torch.isfinite(y).all() and y[0, 0] == torch.finfo(torch.float16).max


@pytest.mark.parametrize("dim", [64, 96, 128])
def test_hadamard_rotation_is_orthogonal_and_self_inverse(dim):
    r = hadamard_matrix(dim)
    assert torch.allclose(r @ r.T, torch.eye(dim), atol=1e-6)
    assert torch.allclose(r, r.T)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_rotation_preserves_scores_and_weighted_sums(name):
    fmt = get_format(name)
    q, k = torch.randn(4, 128), torch.randn(16, 128)
    assert torch.allclose(fmt.to_storage_basis(q) @ fmt.to_storage_basis(k).T, q @ k.T,
                          atol=1e-4)
    p = torch.softmax(torch.randn(4, 16), -1)
    assert torch.allclose(fmt.from_storage_basis(p @ fmt.to_storage_basis(k)), p @ k,
                          atol=1e-5)


def test_unknown_format_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown KV format 'int3'.*int8.*fp8.*int4"):
        get_format("int3")


def test_head_dim_not_divisible_as_format_requires():
    with pytest.raises(ValueError, match="even"):
        get_format("int4").quantize(torch.randn(2, 7))
    with pytest.raises(ValueError, match="group size 32"):
        get_format("int4_g32").bytes_per_token(8, 48)
    with pytest.raises(ValueError, match="floating-point"):
        get_format("int8").quantize(torch.ones(2, 8, dtype=torch.int32))


def test_codebook_int4_beats_uniform_int4_at_no_more_bytes_than_groups_of_32():
    """int4_nl: 72 bytes per 128 values (64 of codes, 8 e4m3 scales); >= 15 % less squared
    round-trip error than int4 (68 B); less than int4_g32 (80 B) on Gaussian values, and
    within 10 % of it on keys with two huge outlier channels (x20, x12: rotated, their
    values cluster around a few points, which a uniform grid with a zero point fits)."""
    nl, uni, g32 = get_format("int4_nl"), get_format("int4"), get_format("int4_g32")
    assert nl.bytes_per_token(1, 128) == 2 * 72
    k, v = outlier_kv()
    for x in (k, v):
        assert rel_rms(nl, x) < 0.92 * rel_rms(uni, x)
    assert rel_rms(nl, v) < rel_rms(g32, v)
    assert rel_rms(nl, k) < 1.1 * rel_rms(g32, k)


def test_codebook_codes_are_the_nearest_level_at_the_best_candidate_scale():
    """Brute force over every candidate scale (each factor times the group's extreme, and
    that candidate's least-squares refit, rounded to e4m3) and every level: the stored
    scale is the candidate with the least squared error and each code the nearest level
    to x / s."""
    from edgekv.quant.codebook import signed_scale

    fmt = get_format("int4_nl")
    G, N = fmt.group_size, 128 // fmt.group_size
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g) * 5
    q = fmt.quantize_storage(xs)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (64, N)
    codes = unpack_int4(q.data).long().view(64, N, G)
    lv = fmt.level_tensor()
    xg = xs.view(64, N, G)
    ext = xg.gather(-1, xg.abs().argmax(-1, keepdim=True))
    errs = []
    for f in fmt.factors:
        raw = ext * f
        for _ in range(2):
            s = signed_scale(raw, torch.float8_e4m3fn).float()
            near = lv[((xg / s).unsqueeze(-1) - lv).abs().argmin(-1)]
            errs.append((xg - near * s).square().sum(-1))
            raw = (xg * near).sum(-1, keepdim=True) / (near * near).sum(-1, keepdim=True)
    errs = torch.stack(errs, -1)  # (64, N, candidates)
    chosen = (xg - lv[codes] * q.scale.float().unsqueeze(-1)).square().sum(-1)
    torch.testing.assert_close(chosen, errs.min(-1).values, rtol=1e-5, atol=1e-6)
    s = q.scale.float().unsqueeze(-1)
    dist = ((xg / s).unsqueeze(-1) - lv).abs()
    assert torch.all(dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
                     <= dist.min(-1).values + 1e-6)
    # decoding is a table lookup times the group's scale
    torch.testing.assert_close(fmt.decode(q).view(64, N, G), lv[codes] * s, rtol=0, atol=0)


def test_codebook_scales_round_to_e4m3_within_its_range():
    """Scales are e4m3 values (round to nearest even, as torch converts), sign kept,
    magnitude clamped to [2^-9, 448]: a huge group clips, a zero group decodes to 0."""
    from edgekv.quant.codebook import signed_scale

    raw = torch.tensor([0.0, -1e-6, 3.3, -3.3, 1e4, -1e4, 0.1234])
    s = signed_scale(raw, torch.float8_e4m3fn).float()
    assert s.tolist()[:6] == [2.0**-9, -(2.0**-9), 3.25, -3.25, 448.0, -448.0]
    assert s[6] == raw[6:].to(torch.float8_e4m3fn).float()
    fmt = get_format("int4_nl")
    x = torch.zeros(3, 128)
    x[1] = 1e4  # beyond e4m3: clipped to the top level times 448
    x[2, :16] = torch.linspace(-1, 1, 16)
    y = fmt.decode(fmt.quantize_storage(x))
    assert torch.equal(y[0], x[0])
    assert torch.all(y[1] == fmt.levels[-1] * 448)
    assert (y[2, :16] - x[2, :16]).abs().max() < 0.1


def test_codebook_extreme_lands_on_either_end_level():
    """A group's extreme decodes within a few % whichever end of the (asymmetric) levels
    its signed scale puts it on; both signs are among the candidates."""
    fmt = get_format("int4_nl")
    assert any(f > 0 for f in fmt.factors) and any(f < 0 for f in fmt.factors)
    x = torch.zeros(3, 128)
    x[0, 5], x[0, 6] = -4.0, 1.0  # group 0's extreme is negative
    x[1] = 0.5
    x[2, 0], x[2, 1] = 4.0, -3.9  # two near-equal extremes of opposite signs
    q = fmt.quantize_storage(x)
    y = fmt.decode(q)
    assert torch.isfinite(y).all() and q.zero is None
    assert torch.isfinite(q.scale.float()).all() and (q.scale.float() != 0).all()
    # (an e4m3 scale has 3 significant bits: the extreme lands within a few %)
    torch.testing.assert_close(y[0, 5], torch.tensor(-4.0), rtol=0.05, atol=0)
    torch.testing.assert_close(y[1], x[1], rtol=0.05, atol=0)
    torch.testing.assert_close(y[2, :2], x[2, :2], rtol=0.06, atol=0)


def test_codebook_flipped_candidates_err_less_on_gaussian_groups():
    """The flipped candidates (extreme on the bottom level) never lose to the positive
    multiples alone, group by group, and win >= 4 % of the squared error on Gaussian
    groups (measured 6.6 % on the demo model's keys and values)."""
    from edgekv.quant.codebook import MULTIPLES, CodebookFormat

    both = get_format("int4_nl")
    up = CodebookFormat("up", group_size=both.group_size, factors=MULTIPLES)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))

    def err(fmt):  # (512, groups)
        y = fmt.decode(fmt.quantize_storage(x))
        return (y - x).square().view(512, -1, fmt.group_size).sum(-1)

    e_both, e_up = err(both), err(up)
    assert torch.all(e_both <= e_up * (1 + 1e-6))
    assert e_both.sum() < 0.96 * e_up.sum()
