"""Calibration-based quantization on a synthetic layer with uneven, correlated activation channels."""

import pytest
import torch

from ditkern.quant import formats as F
from ditkern.quant.calibrate import LayerStats, awq_quantize, gptq_quantize, layer_error


def _layer():
    K, N = 128, 48
    x = torch.randn(256, K) * (torch.rand(K) * 3 + 0.1) + 0.5 * torch.randn(256, 1) * torch.randn(1, K)
    return torch.randn(N, K), LayerStats(x.abs().mean(0), x, 256)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4"])
def test_gptq_and_awq_lower_the_output_error_on_calibration_rows(fmt):
    w, st = _layer()
    base = layer_error(w, F.quantize(w, fmt, 64), st)
    g = gptq_quantize(w, fmt, 64, "fp32", st)
    a, alpha, err = awq_quantize(w, fmt, 64, "fp32", st)
    assert layer_error(w, g, st) < 0.9 * base  # measured 0.72x (fp4) / 0.74x (int4) of absmax (seed 0)
    assert err <= base and alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
    # GPTQ output is an ordinary packed weight: codes on the grid, scales as stored
    assert torch.equal(F.unpack(g.packed, g.fmt)[:, 128:], torch.zeros(48, 0, dtype=torch.uint8))
    assert g.scales.dtype == torch.float32 and g.smooth is None


def test_gptq_with_bf16_scales_and_dead_channel():
    w, st = _layer()
    st.rows[:, 5] = 0.0  # a channel that never fires
    g = gptq_quantize(w, "fp6_e3m2", 32, "bf16", st)
    assert g.scales.dtype == torch.bfloat16
    assert torch.all(g.dequantize()[:, 5] == 0)  # GPTQ zeroes weights of dead inputs (they cannot matter)
    assert layer_error(w, g, st) < layer_error(w, F.quantize(w, "fp6_e3m2", 32, "bf16"), st)
