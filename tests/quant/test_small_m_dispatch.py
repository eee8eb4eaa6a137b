"""With FP8 activations, a call of at most SMALL_M_ROWS rows runs the weight-only path where the small-M CUDA GEMV can
serve it (memory-bound: FP8 tensor cores cannot help and the GEMV skips the activation quantization); larger calls
run the W4A8 GEMM. The GEMV cannot run here, so the rule is checked with the backend probe answering "cuda"; the
outputs are the two paths' references (independent: dequantize + matmul with and without FP8 activations)."""

from __future__ import annotations

import torch
from torch import nn

from ditkern.formats import quantize
from ditkern.ops.fpx_fp8_linear import fpx_fp8_linear_ref
from ditkern.ops.fpx_linear import fpx_linear_ref
from ditkern.quant import feature
from ditkern.quant.config import QuantConfig
from ditkern.quant.feature import SMALL_M_ROWS


def _plan(monkeypatch, gemv: bool):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    qw = quantize(lin.weight.detach(), "fp4_e2m1", 32)
    monkeypatch.setattr(feature, "_small_m_backend", lambda w, q, b: "cuda" if gemv else "torch")
    plan = feature._plan(lin, qw, "e4m3", None, QuantConfig(format="fp4_e2m1", group_size=32, activations="fp8"))
    plan.apply(lin)
    return lin, qw, plan


def _refs(x, lin, qw):
    kw = dict(format="fp4_e2m1", group_size=32, in_features=64)
    wo = fpx_linear_ref(x, qw.packed, qw.scales, lin.bias.detach(), **kw)
    a8 = fpx_fp8_linear_ref(x, qw.packed, qw.scales, lin.bias.detach(), **kw)
    assert not torch.equal(wo, a8)  # the two paths are distinguishable
    return wo, a8


def test_few_rows_take_the_weight_only_gemv_and_many_rows_the_w4a8_gemm(monkeypatch):
    lin, qw, plan = _plan(monkeypatch, gemv=True)
    assert f"calls of <= {SMALL_M_ROWS} rows: weight-only" in plan.detail
    with torch.no_grad():
        for rows, path in ((SMALL_M_ROWS, 0), (SMALL_M_ROWS + 1, 1)):
            x = torch.randn(rows, 64)
            out = plan.new_forward(lin, x)
            ref = _refs(x, lin, qw)
            # the op may run the Triton interpreter here (another fp32 summation order): 1e-5 against a 4e-2 gap
            torch.testing.assert_close(out, ref[path], rtol=0, atol=1e-5, msg=lambda m: f"{rows} rows: {m}")


def test_without_the_gemv_every_call_is_w4a8(monkeypatch):
    lin, qw, plan = _plan(monkeypatch, gemv=False)
    assert "weight-only" not in plan.detail
    with torch.no_grad():
        x = torch.randn(4, 64)
        torch.testing.assert_close(plan.new_forward(lin, x), _refs(x, lin, qw)[1], rtol=0, atol=1e-5)
