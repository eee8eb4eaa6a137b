"""quantize_fp8 (per-token FP8 activation quantization) against its torch reference, including non-finite rows."""

import pytest
import torch

from ditkern.ops.quantize_fp8 import quantize_fp8, quantize_fp8_ref


def _bits(xq):
    return xq.view(torch.uint8)


@pytest.mark.parametrize("grid", ["e4m3", "fp6_e3m2", "fp6_e2m3"])
def test_nan_propagates_like_the_reference(grid):
    """A NaN in a row makes that row's scale and codes NaN, as in the torch reference; it must not saturate to
    +-448 (what a GPU min/max clamp does: min/max return the non-NaN operand) nor leave a finite scale."""
    x = torch.randn(4, 300) * 3
    x[1, 17] = float("nan")
    x[3, 0] = float("nan")
    xq, sx = quantize_fp8(x, grid, backend="triton")
    rq, rs = quantize_fp8_ref(x, grid)
    assert torch.isnan(rs[[1, 3]]).all() and torch.isfinite(rs[[0, 2]]).all()
    assert torch.equal(torch.isnan(sx), torch.isnan(rs))
    assert torch.isnan(xq[[1, 3]].float()).all(), "rows holding NaN must stay NaN, not saturate"
    assert torch.equal(sx[[0, 2]], rs[[0, 2]]) and torch.equal(_bits(xq[[0, 2]]), _bits(rq[[0, 2]]))


def test_finite_rows_match_the_reference_bit_for_bit():
    x = torch.randn(7, 333, dtype=torch.float16) * 10
    x[2] = 0  # an all-zero row gets scale 1
    xq, sx = quantize_fp8(x, backend="triton")
    rq, rs = quantize_fp8_ref(x)
    assert sx[2] == 1 and torch.equal(sx, rs) and torch.equal(_bits(xq), _bits(rq))
