"""The MoE bench cases build and run at a tiny shape on the CPU (a harness check, not a measurement)."""

import torch

from bench import registry
from bench.ops import moe as bench_moe


def test_moe_bench_cases_run_and_agree(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", [])
    dims = dict(T=40, D=32, hidden=48, E=4, K=2)
    bench_moe.register_cases({"tiny": dims})
    (case,) = registry.REGISTRY
    assert case.baseline_names == ("diffusers", "grouped_mm", "compile", "dense")
    i = case.make_inputs("cpu", torch.float32)
    out = {name: fn(i) for name, fn in case.impls.items() if name not in ("compile", "grouped_mm")}
    torch.testing.assert_close(out["ditkern"], out["diffusers"], atol=2e-6, rtol=1e-5)
    try:  # torch >= 2.8 has a CPU grouped_mm; on a torch without one the bench row says why
        grouped = case.impls["grouped_mm"](i)
    except RuntimeError as exc:
        assert "grouped_mm" in str(exc) or "stride" in str(exc), exc
    else:  # the baseline computes the same layer (its own routing, gather, two grouped GEMMs, index_add)
        torch.testing.assert_close(grouped, out["diffusers"], atol=2e-6, rtol=1e-5)
    F = i["layer"].experts[0].w1.out_features
    Fs = i["layer"].shared_experts.w1.out_features
    assert case.flops(i) == 2 * 40 * 32 * 4 + 6 * 40 * 2 * 32 * F + 6 * 40 * 32 * Fs
    assert case.bytes_moved(i) > 0
