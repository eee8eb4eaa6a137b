"""adaLN-modulate with the fused FP8 epilogue equals adaln_modulate followed by quantize_fp8, bit for bit."""

import pytest
import torch

from ditkern.ops.adaln_modulate import adaln_modulate
from ditkern.ops.adaln_modulate_fp8 import adaln_modulate_fp8, adaln_modulate_fp8_ref
from ditkern.ops.quantize_fp8 import quantize_fp8


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid", ["e4m3", "fp6_e3m2"])
def test_fused_equals_unfused(norm, dtype, grid):
    B, S, D = 2, 5, 200  # D not a power of two
    x = torch.randn(B, S + 3, D)[:, 2:7].to(dtype)  # strided rows
    emb = torch.randn(B, 6 * D).to(dtype)
    shift, scale = emb[:, :D], emb[:, D : 2 * D]  # strided chunks of a modulation tensor
    w, b = torch.randn(D), torch.randn(D)
    out, xq, sx = adaln_modulate_fp8(x, shift, scale, norm=norm, weight=w, bias=b, grid=grid, backend="triton")
    ref_out = adaln_modulate(x, shift, scale, norm=norm, weight=w, bias=b, backend="triton")
    rq, rs = quantize_fp8(ref_out, grid, backend="triton")
    assert torch.equal(out, ref_out)
    assert torch.equal(sx, rs) and torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    o2, q2, s2 = adaln_modulate_fp8_ref(x, shift, scale, norm=norm, weight=w, bias=b, grid=grid)
    torch.testing.assert_close(out, o2)  # the torch reference: same function up to fp32 summation order
    assert xq.shape == (B * S, D) and sx.shape == (B * S,)


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="grid='int8' is not one of"):
        adaln_modulate_fp8(torch.randn(1, 2, 8), None, None, grid="int8")


@pytest.mark.gpu
def test_gpu_bf16_fused_equals_unfused():
    x = torch.randn(2, 333, 3072, device="cuda").bfloat16()
    shift, scale = torch.randn(2, 2, 3072, device="cuda").bfloat16().unbind(1)
    out, xq, sx = adaln_modulate_fp8(x, shift, scale, backend="triton")
    ref = adaln_modulate(x, shift, scale, backend="triton")
    torch.testing.assert_close(out, ref)  # two kernels computing one function (reduction order may differ)
    rq, rs = quantize_fp8(out, backend="triton")  # the epilogue is exactly quantize_fp8 of the stored row
    assert torch.equal(sx, rs) and torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))


def test_nan_row_propagates():
    """A NaN in x makes its row's scale and FP8 codes NaN (as adaln_modulate + quantize_fp8 in torch), not +-448."""
    x = torch.randn(1, 4, 64)
    x[0, 2, 5] = float("nan")
    shift, scale = torch.randn(1, 64), torch.randn(1, 64)
    out, xq, sx = adaln_modulate_fp8(x, shift, scale, backend="triton")
    _, rq, rs = adaln_modulate_fp8_ref(x, shift, scale)
    assert torch.equal(torch.isnan(sx), torch.isnan(rs)) and torch.isnan(sx[2])
    assert torch.isnan(xq[2].float()).all() and torch.isfinite(xq[[0, 1, 3]].float()).all()
