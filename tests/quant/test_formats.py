"""Formats, exact reference quantizer and packing: every code, every E4M3 image, RNE ties, saturation, SQNR floors."""

import math

import pytest
import torch

from ditkern.quant import formats as F

ALL = sorted(F.FORMATS)


def test_value_tables_match_the_ocp_definitions():
    assert F.FORMATS["fp4_e2m1"].magnitudes().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    e3m2 = F.FORMATS["fp6_e3m2"].magnitudes()
    assert e3m2[1].item() == 0.0625 and e3m2[-1].item() == 28 and len(e3m2) == 32
    e2m3 = F.FORMATS["fp6_e2m3"].magnitudes()
    assert e2m3[1].item() == 0.125 and e2m3[-1].item() == 7.5 and len(e2m3) == 32
    assert F.FORMATS["int4"].magnitudes().tolist() == list(range(8))
    for f in F.FORMATS.values():
        mags = f.magnitudes()
        assert torch.all(mags[1:] > mags[:-1]), f.name  # code order is value order


@pytest.mark.parametrize("name", ALL)
def test_every_code_roundtrips(name):
    fmt = F.FORMATS[name]
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    values = F.decode(codes, fmt)
    back = F.encode(F.round_to_grid(values, fmt), fmt)
    neg_zero = 1 << (fmt.bits - 1)
    keep = codes != neg_zero
    assert torch.equal(back[keep], codes[keep])
    assert back[neg_zero].item() == 0  # "-0" decodes to -0.0 and re-encodes as the zero code
    # packing every code (repeated so the row length is a whole packing unit) is inverted by unpacking
    row = codes.repeat(2, 12)[:, : 12 * (1 << fmt.bits) // fmt.codes_per_unit * fmt.codes_per_unit]
    assert torch.equal(F.unpack(F.pack(row, fmt), fmt), row)


@pytest.mark.parametrize("name", ALL)
def test_every_code_is_exact_in_e4m3(name):
    fmt = F.FORMATS[name]
    values = fmt.values()
    assert torch.equal(values.to(torch.float8_e4m3fn).double(), values)  # the value itself is an E4M3 number
    image = F.e4m3_image_bits(fmt).view(torch.float8_e4m3fn).double()  # what the FP8 GEMM feeds the tensor cores
    assert torch.equal(image * 2.0**fmt.e4m3_shift, values)


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp6_e3m2"])
def test_pack_unpack_inverse_on_random_bytes(name):
    fmt = F.FORMATS[name]
    codes = torch.randint(0, 1 << fmt.bits, (7, 64), dtype=torch.uint8)
    packed = F.pack(codes, fmt)
    assert packed.shape == (7, 64 * fmt.bits // 8)
    assert torch.equal(F.unpack(packed, fmt), codes)
    raw = torch.randint(0, 256, packed.shape, dtype=torch.uint8)
    assert torch.equal(F.pack(F.unpack(raw, fmt), fmt), raw)
    # documented layout: FP4 low nibble first; FP6 two planes: the high 4 bits packed like FP4, then the low 2 bits
    # four to a byte, lowest first
    c = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    if fmt.bits == 4:
        assert F.pack(c, fmt).tolist() == [[0x21, 0x43]]
    else:
        assert F.pack(c, fmt).tolist() == [[0x00, 0x10, 1 | 2 << 2 | 3 << 4 | 0 << 6]]
        # layout 1 (ditkern-quant-1 checkpoints): code 4j+i in bits [6i, 6i+6) of a little-endian 24-bit word
        word = 1 | 2 << 6 | 3 << 12 | 4 << 18
        old = torch.tensor([[word & 255, word >> 8 & 255, word >> 16]], dtype=torch.uint8)
        assert torch.equal(F.unpack_layout1(old, fmt), c)


@pytest.mark.parametrize("name", ALL)
def test_rounding_is_nearest_even_against_brute_force(name):
    fmt = F.FORMATS[name]
    vals = fmt.values().float()
    mags = fmt.magnitudes().float()
    mids = (mags[1:] + mags[:-1]) / 2  # every tie, both signs
    v = torch.cat([torch.randn(4000) * fmt.max / 2, mids, -mids, mids + 1e-6, mids - 1e-6])
    got = F.round_to_grid(v, fmt)
    d = (v[:, None] - vals[None, :]).abs()
    best = d.min(1, keepdim=True).values
    cand = (d == best) & ((torch.arange(len(vals)) % 2 == 0)[None, :] | (d == best).sum(1, keepdim=True).eq(1))
    want = vals[cand.float().argmax(1)]  # nearest; on a tie the even code (mantissa LSB 0)
    assert torch.equal(got.abs(), want.abs())
    assert F.round_to_grid(torch.tensor([1e6, -1e6]), fmt).tolist() == [fmt.max, -fmt.max]  # saturation


def test_known_ties():
    e2m1 = F.FORMATS["fp4_e2m1"]
    assert F.round_to_grid(torch.tensor([0.25, 0.75, 2.5, 5.0, -5.0]), e2m1).tolist() == [0.0, 1.0, 2.0, 4.0, -4.0]
    assert F.round_to_grid(torch.tensor([0.5, 1.5, 2.5]), F.FORMATS["int4"]).tolist() == [0.0, 2.0, 2.0]


@pytest.mark.parametrize("scale_dtype", F.SCALE_DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_quantize_dequantize_and_scale_dtypes(name, scale_dtype):
    w = torch.randn(9, 100)  # K = 100: not a multiple of the group size
    q = F.quantize(w, name, 32, scale_dtype)
    fmt = q.fmt
    assert q.packed.shape == (9, 128 * fmt.bits // 8) and q.scales.shape == (9, 4)
    codes = F.unpack(q.packed, fmt)
    assert torch.all(codes[:, 100:] == 0)  # padding is the zero code
    s = F.load_scale(q.scales)
    if scale_dtype == "e8m0":
        assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two
        assert torch.all(s >= F.absmax_scales(w, fmt, 32))  # rounded up: nothing saturates
    w_hat = q.dequantize()
    # each weight is within half a grid step of its (scaled) value: |w - w_hat| <= max gap / 2 * scale
    gap = (fmt.magnitudes()[1:] - fmt.magnitudes()[:-1]).max().item()
    srep = s.repeat_interleave(32, 1)[:, :100]
    assert torch.all((w - w_hat).abs() <= gap / 2 * srep * (1 + 1e-6) + 1e-12)


# SQNR floors (dB) for absmax quantize-dequantize, group 64, fp32 scales, [256, 512] weights, seed 0.
# The values measured at commit time are in the comments; a floor sits 1 dB below to allow other seeds and torch
# versions while catching a broken rounding or scale.
SQNR_FLOORS = {
    # format: (gaussian floor, student-t(3) floor)
    "fp4_e2m1": (18.5, 17.0),  # measured 19.51 / 17.99
    "int4": (18.3, 13.7),  # measured 19.36 / 14.76 (a uniform grid suffers most from the heavy tail's outliers)
    "fp6_e3m2": (25.0, 26.4),  # measured 26.02 / 27.48 (3 exponent bits: heavy tails suit it better)
    "fp6_e2m3": (30.8, 30.0),  # measured 31.85 / 31.04
}


@pytest.mark.parametrize("name", ALL)
def test_sqnr_floors(name):
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 512, generator=g)
    heavy = torch.distributions.StudentT(3.0).sample((256, 512))
    floor_g, floor_h = SQNR_FLOORS[name]
    assert F.sqnr_db(gauss, F.quantize(gauss, name, 64).dequantize()) >= floor_g
    assert F.sqnr_db(heavy, F.quantize(heavy, name, 64).dequantize()) >= floor_h


def test_non_finite_and_huge_weights():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.proj has 1 non-finite value.*\(2, 5\)"):
        F.quantize(w, name="blocks.0.proj")
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize(w)
    w[2, 5] = 3e38  # huge but finite: its group's scale absorbs it, nothing overflows
    q = F.quantize(w, "fp4_e2m1", 32)
    assert torch.isfinite(q.dequantize()).all()
    assert q.dequantize()[2, 5].item() == pytest.approx(3e38, rel=1e-6)
    # a scale that is too small saturates instead of overflowing
    q = F.quantize(torch.full((1, 32), 100.0), "fp4_e2m1", 32, scales=torch.ones(1, 1))
    assert q.dequantize().max().item() == 6.0


def test_zero_group_gets_zero_codes():
    w = torch.zeros(2, 64)
    w[1, 40] = 1.0
    q = F.quantize(w, "fp6_e2m3", 32)
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="fp5"), "format='fp5' is not a known format"),
        (dict(group_size=0), "group_size=0 must be positive"),
        (dict(group_size=-32), "group_size=-32 must be positive"),
        (dict(group_size=30), "group_size=30 must be a multiple of the packing unit"),
        (dict(group_size=48), "group_size=48 is not supported"),
        (dict(scale_dtype="fp16"), "scale_dtype='fp16' is not one of"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = dict(format="fp6_e3m2", group_size=64, scale_dtype="fp32") | kwargs
    with pytest.raises(ValueError, match=match):
        F.quantize(torch.randn(4, 64), **args)


def test_bits_per_weight():
    assert F.bits_per_weight("fp4_e2m1", 64) == 4.5
    assert F.bits_per_weight("fp6_e3m2", 128, "bf16") == 6.125
    assert math.isclose(F.bits_per_weight("int4", 32, "e8m0"), 4.25)
