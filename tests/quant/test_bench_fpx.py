"""The FP4/FP6 GEMM bench file registers GPU-sized cases; its torch-path implementations run at a tiny shape on CPU."""

import torch

from bench import registry
from bench.ops import fpx_gemm


def test_cases_register_and_cpu_paths_run():
    registry.REGISTRY.clear()
    fpx_gemm.register_cases({"tiny": dict(M=4, K=128, N=64)})
    (case,) = registry.REGISTRY
    assert case.baseline_names == ("cublas-bf16", "scaled_mm-fp8")
    inputs = case.make_inputs("cpu", torch.float32)
    ref = inputs["x"] @ inputs["w_bf16"].float().T
    for name in ("ditkern-w4", "ditkern-w6", "ditkern-w4a8", "ditkern-w6a8"):
        out = case.impls[name](inputs)
        assert out.shape == (4, 64)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 0.2, (name, rel)  # 4-bit weights: a few % error, not garbage
    assert case.flops(inputs) == 2 * 4 * 128 * 64 and case.bytes_moved(inputs) > 0
    assert fpx_gemm.SHAPES["flux_1024_qkv_M4608"] == dict(M=4608, K=3072, N=9216)
    assert len(fpx_gemm.SHAPES) == 4 * 2 * 5 + 2 * 2 and fpx_gemm.QUICK_SHAPES == {}
    registry.REGISTRY.clear()
