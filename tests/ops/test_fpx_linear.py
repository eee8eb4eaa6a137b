"""FP4/FP6/int4 GEMMs (weight-only and W4A8/W6A8) and the FP8 activation quantizer: Triton (interpreter on CPU)
against the references; exact decoding of every code; odd shapes (K not a multiple of the group, odd N and M)."""

import pytest
import torch

from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear, fpx_fp8_linear_ref, fpx_fp8_matmul
from ditkern.ops.fpx_linear import fpx_linear, fpx_linear_ref
from ditkern.ops.quantize_fp8 import quantize_fp8, quantize_fp8_ref
from ditkern.quant import formats as F

ALL = sorted(F.FORMATS)


def _q(N, K, fmt, G=32, scale_dtype="fp32", smooth=False):
    w = torch.randn(N, K)
    sm = torch.rand(K) + 0.5 if smooth else None
    return w, F.quantize(w, fmt, G, scale_dtype, smooth=sm)


def _kw(q):
    from ditkern.quant.formats import inv_smooth

    return dict(format=q.format, group_size=q.group_size, in_features=q.shape[1], inv_smooth=inv_smooth(q.smooth))


@pytest.mark.parametrize("fmt", ALL)
def test_kernels_decode_every_code_exactly(fmt):
    """x = identity picks out single weights: out[k, n] must equal the reference W_hat[n, k] bit for bit."""
    f = F.FORMATS[fmt]
    K = 1 << f.bits  # every code once per row, rows shifted so each code meets every position parity
    codes = torch.stack([torch.roll(torch.arange(K), r) for r in range(3)]).to(torch.uint8).repeat(1, 2)  # [3, 2K]
    codes = (
        torch.cat([codes, torch.zeros(3, 64 - codes.shape[1] % 64, dtype=torch.uint8)], 1)
        if codes.shape[1] % 64
        else codes
    )
    Kp = codes.shape[1]
    packed = F.pack(codes, f)
    scales = torch.rand(3, Kp // 32) + 0.5
    q = F.QuantizedWeight(packed, scales, fmt, 32, (3, Kp))
    w_hat = q.dequantize()
    eye = torch.eye(Kp)
    out = fpx_linear(eye, packed, scales, format=fmt, group_size=32, in_features=Kp, backend="triton")
    assert torch.equal(out, w_hat.T)
    xq, sx = eye.to(torch.float8_e4m3fn), torch.ones(Kp)
    out8 = fpx_fp8_matmul(xq, sx, packed, scales, format=fmt, group_size=32, in_features=Kp, out_dtype=torch.float32,
                          backend="triton")  # fmt: skip
    assert torch.equal(out8, w_hat.T)


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fpx_linear_triton_matches_reference(fmt, dtype):
    # K=100 (not a multiple of the group size 32), N=33 (odd), M=2*7 rows from a non-contiguous view
    w, q = _q(33, 100, fmt, scale_dtype="bf16" if dtype == torch.float16 else "fp32")
    bias = torch.randn(33)
    x = torch.randn(2, 7, 130)[..., 10:110].to(dtype)
    got = fpx_linear(x, q.packed, q.scales, bias, backend="triton", **_kw(q))
    ref64 = x.double() @ q.dequantize().double().T + bias.double()
    # STYLE.md rule: err(kernel) <= 2 * err(torch in the same dtype) + floor, against fp64
    same_dtype = torch.nn.functional.linear(x, q.dequantize(dtype), bias.to(dtype))
    err_torch = (same_dtype.double() - ref64).abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    assert got.shape == (2, 7, 33) and got.dtype == dtype
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    ref = fpx_linear_ref(x, q.packed, q.scales, bias, **_kw(q))
    torch.testing.assert_close(got, ref, rtol=0, atol=max(2 * err_torch, 1e-5))


def test_fpx_linear_with_smoothing_and_e8m0():
    w, q = _q(17, 96, "fp4_e2m1", G=32, scale_dtype="e8m0", smooth=True)
    x = torch.randn(5, 96)
    got = fpx_linear(x, q.packed, q.scales, backend="triton", **_kw(q))
    ref64 = x.double() @ q.dequantize().double().T  # dequantize() folds 1/smooth into W_hat
    assert (got.double() - ref64).abs().max().item() < 1e-4


@pytest.mark.parametrize("grid", ["e4m3", "fp6_e3m2", "fp6_e2m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_fp8_triton_is_bit_exact(grid, dtype):
    x = (torch.randn(3, 5, 300) * torch.logspace(-3, 3, 300)).to(dtype)  # a wide dynamic range per row
    x[1, 2] = 0.0  # an all-zero row: scale 1, codes 0
    inv = torch.rand(300) + 0.5
    for inv_smooth in (None, inv):
        xq, sx = quantize_fp8(x, grid, inv_smooth, backend="triton")
        rq, rs = quantize_fp8_ref(x, grid, inv_smooth)
        assert torch.equal(sx, rs)
        assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    assert sx[7].item() == 1.0 and torch.all(xq[7].float() == 0)
    g = F.ACT_GRIDS[grid]
    assert torch.equal(F.round_to_grid(xq.float(), g), xq.float())  # values lie on the grid
    assert xq.float().abs().amax(-1).max().item() == g.max  # the absmax of each row maps to the grid's max


def test_quantize_fp8_rounds_to_nearest_even():
    x = torch.tensor([[448.0, 0.0, 1.0625, 1.1875, -1.0625, 447.0]])
    xq, sx = quantize_fp8_ref(x)
    assert sx.item() == 1.0
    assert xq.float().tolist() == [[448.0, 0.0, 1.0, 1.25, -1.0, 448.0]]  # 1.0625 ties to 1.0 (even), 1.1875 to 1.25


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("act", ["e4m3", "fp6_e3m2"])
def test_fpx_fp8_linear_triton_matches_reference(fmt, act):
    w, q = _q(33, 100, fmt)
    bias = torch.randn(33)
    x = torch.randn(3, 5, 100)
    got = fpx_fp8_linear(x, q.packed, q.scales, bias, act=act, backend="triton", **_kw(q))
    ref = fpx_fp8_linear_ref(x, q.packed, q.scales, bias, act=act, **_kw(q))
    # identical quantized operands and exact products: only the fp32 summation order differs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and the W4A8 result is close to the weight-only one: FP8 activations cost ~30 dB SQNR on Gaussian x
    wo = fpx_linear_ref(x, q.packed, q.scales, bias, **_kw(q))
    assert F.sqnr_db(wo, got) > (28.0 if act == "e4m3" else 20.0)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e3m2"])
def test_fpx_fp8_linear_unpredicated_tiles(fmt):
    """N a multiple of the tile and K == K_pad: the kernel's unmasked weight / activation loads (EVEN_N, EVEN_K)."""
    w, q = _q(128, 64, fmt)
    x = torch.randn(5, 64)
    got = fpx_fp8_linear(x, q.packed, q.scales, backend="triton", **_kw(q))
    torch.testing.assert_close(got, fpx_fp8_linear_ref(x, q.packed, q.scales, **_kw(q)), rtol=1e-5, atol=1e-5)


def test_fpx_fp8_linear_fp16_and_smoothing():
    w, q = _q(40, 64, "fp6_e2m3", G=64, scale_dtype="bf16", smooth=True)
    x = torch.randn(9, 64).half()
    got = fpx_fp8_linear(x, q.packed, q.scales, backend="triton", **_kw(q))
    ref = fpx_fp8_linear_ref(x, q.packed, q.scales, **_kw(q))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)  # one fp16 rounding of the output


def test_bad_arguments_name_the_argument():
    w, q = _q(8, 64, "fp4_e2m1")
    kw = _kw(q)
    with pytest.raises(ValueError, match="x must be \\[..., K\\] with K=in_features=64"):
        fpx_linear(torch.randn(2, 63), q.packed, q.scales, **kw)
    with pytest.raises(ValueError, match="packed must be \\[N, 32\\]"):
        fpx_linear(torch.randn(2, 64), q.packed[:, :16], q.scales, **kw)
    with pytest.raises(ValueError, match="scales must be"):
        fpx_linear(torch.randn(2, 64), q.packed, q.scales[:, :1], **kw)
    with pytest.raises(ValueError, match="group_size=0 must be positive"):
        fpx_linear(torch.randn(2, 64), q.packed, q.scales, **(kw | dict(group_size=0)))
    with pytest.raises(ValueError, match="format='fp3' is not a known format"):
        fpx_linear(torch.randn(2, 64), q.packed, q.scales, **(kw | dict(format="fp3")))
    with pytest.raises(ValueError, match="act='e5m2' is not one of"):
        fpx_fp8_linear(torch.randn(2, 64), q.packed, q.scales, act="e5m2", **kw)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        quantize_fp8(torch.ones(2, 4, dtype=torch.int32))


def test_compile_fullgraph():
    w, q = _q(16, 64, "fp6_e3m2", G=64)
    x = torch.randn(4, 64)

    def f(x):
        a = fpx_linear(x, q.packed, q.scales, format="fp6_e3m2", group_size=64, in_features=64, backend="triton")
        b = fpx_fp8_linear(x, q.packed, q.scales, format="fp6_e3m2", group_size=64, in_features=64, backend="triton")
        return a + b

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ALL)
def test_gpu_bf16_gemms_match_reference(fmt):
    torch.manual_seed(1)
    w = torch.randn(1000, 3072, device="cuda")
    q = F.quantize(w, fmt, 64)
    bias = torch.randn(1000, device="cuda").bfloat16()
    kw = _kw(q)
    for M in (1, 16, 300):
        x = torch.randn(M, 3072, device="cuda").bfloat16()
        ref64 = x.double() @ q.dequantize().double().T + bias.double()
        same = torch.nn.functional.linear(x, q.dequantize(torch.bfloat16), bias)
        err_torch = (same.double() - ref64).abs().max().item()
        got = fpx_linear(x, q.packed, q.scales, bias, backend="triton", **kw)
        assert (got.double() - ref64).abs().max().item() <= 2 * err_torch + 1e-3
        got8 = fpx_fp8_linear(x, q.packed, q.scales, bias, backend="triton", **kw)
        ref8 = fpx_fp8_linear_ref(x, q.packed, q.scales, bias, **kw)
        assert (got8.double() - ref8.double()).abs().max().item() <= 2 * err_torch + 1e-3
        xq, sx = quantize_fp8(x, backend="triton")
        rq, rs = quantize_fp8_ref(x)
        assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sx, rs)


# ------------------------------------------------------------------------------------------------------- CUDA GEMV
def _has_ext():
    from ditkern._ext import ext_missing

    return ext_missing() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less error path")
def test_cuda_gemv_without_gpu_raises_clear_error():
    if not _has_ext():
        pytest.skip("ditkern._C is not built")
    from ditkern._ext import ext

    with pytest.raises(RuntimeError, match=r"ditkern\._C\.fpx_gemv: CUDA error \d+"):
        ext().fpx_gemv(0, 0, 0, 0, 0, 0, 1, 8, 64, 64, [64, 32, 1, 8], 64, 4, 0, 0, [0.0] * 16, 0, 0)


def test_cuda_gemv_rejects_bad_arguments():
    if not _has_ext():
        pytest.skip("ditkern._C is not built")
    from ditkern._ext import ext

    with pytest.raises(ValueError, match="strides must have 4 entries"):
        ext().fpx_gemv(0, 0, 0, 0, 0, 0, 1, 8, 64, 64, [64], 64, 4, 0, 0, [0.0] * 16, 0, 0)
    with pytest.raises(ValueError, match="lut needs 2\\*\\*bits entries"):
        ext().fpx_gemv(0, 0, 0, 0, 0, 0, 1, 8, 64, 64, [64, 32, 1, 8], 64, 6, 0, 0, [0.0] * 16, 0, 0)
    with pytest.raises(ValueError, match="M must be in \\[1, 16\\]"):
        ext().fpx_gemv(0, 0, 0, 0, 0, 0, 17, 8, 64, 64, [64, 32, 1, 8], 64, 4, 0, 0, [0.0] * 16, 0, 0)


def test_cuda_backend_says_why_it_cannot_run():
    from ditkern.ops.fpx_linear import BACKENDS

    reason = BACKENDS["cuda"](torch.randn(2, 64))
    assert reason and ("not built" in reason or "tensors are on cpu" in reason)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("scale_dtype", F.SCALE_DTYPES)
def test_gpu_cuda_gemv_matches_reference(fmt, scale_dtype):
    torch.manual_seed(2)
    w = torch.randn(777, 1000, device="cuda")  # K=1000: not a multiple of the group, odd N
    sm = torch.rand(1000, device="cuda") + 0.5
    q = F.quantize(w, fmt, 64, scale_dtype, smooth=sm)
    bias = torch.randn(777, device="cuda")
    kw = _kw(q)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for M in (1, 3, 16):
            x = torch.randn(M, 1000, device="cuda").to(dtype)
            ref64 = (x.double() * kw["inv_smooth"].double()) @ (q.dequantize().double() * sm.double()).T
            ref64 = ref64 + bias.double()
            same = torch.nn.functional.linear(x, q.dequantize(dtype), bias.to(dtype))
            err_torch = (same.double() - ref64).abs().max().item()
            got = fpx_linear(x, q.packed, q.scales, bias, backend="cuda", **kw)
            assert (got.double() - ref64).abs().max().item() <= 2 * err_torch + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ALL)
def test_gpu_cuda_gemv_every_m_bucket_and_8_byte_rows(fmt):
    """K_pad % 64 == 32 (G=32, K=200 -> K_pad=224: FP6 rows of 168 bytes, the GEMV's 8-byte load path), a K tail, the
    M buckets 1 / 2 / 4 / 16 of the kernel (scale per chunk for M <= 4, folded into the weights above), a row
    count that leaves a warp's 4-row tile partly empty, bf16 scales."""
    torch.manual_seed(3)
    w = torch.randn(203, 200, device="cuda")
    q = F.quantize(w, fmt, 32, "bf16")
    bias = torch.randn(203, device="cuda")
    kw = _kw(q)
    for M in (1, 2, 3, 5, 8, 13, 16):
        x = torch.randn(M, 200, device="cuda").bfloat16()
        ref64 = x.double() @ q.dequantize().double().T + bias.double()
        same = torch.nn.functional.linear(x, q.dequantize(torch.bfloat16), bias.bfloat16())
        err_torch = (same.double() - ref64).abs().max().item()
        got = fpx_linear(x, q.packed, q.scales, bias, backend="cuda", **kw)
        assert (got.double() - ref64).abs().max().item() <= 2 * err_torch + 1e-4, M


# ---------------------------------------------------------------------------------------------- quantize + pack
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("scale_dtype", F.SCALE_DTYPES)
def test_triton_quantize_pack_is_bit_exact(fmt, scale_dtype):
    from ditkern.ops.fpx_quantize import fpx_quantize

    w = torch.randn(7, 200) * torch.logspace(-2, 2, 200)  # K=200: a partial last group; a wide range
    w[3, :64] = 0.0  # an all-zero group
    w[5, 7] = 1e30  # a huge value in one group
    for G in (32, 128) if scale_dtype == "fp32" else (32,):
        got = fpx_quantize(w, fmt, G, scale_dtype, backend="triton")
        ref = F.quantize(w, fmt, G, scale_dtype)
        assert torch.equal(got.packed, ref.packed)
        assert torch.equal(got.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    with pytest.raises(ValueError, match="layer.x has 1 non-finite"):
        w[0, 0] = float("nan")
        fpx_quantize(w, fmt, 32, scale_dtype, name="layer.x", backend="triton")
