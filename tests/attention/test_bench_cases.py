"""The attention bench cases build and run (CPU, tiny stand-ins of the real shapes; timing is the GPU suite's job)."""

import torch

from bench import registry
from bench.ops import linear_attention as lin_bench
from bench.ops import window_attention as win_bench


def test_window_cases_register_and_agree(monkeypatch):
    monkeypatch.setitem(win_bench.ATTN_SHAPES, "tiny", ((12, 16), 8, 2, 32))
    registry.REGISTRY.clear()
    win_bench.register_cases({"tiny/q25": ("tiny", "q25")})
    cases = list(registry.REGISTRY)
    assert {c.op for c in cases} == {"window_attention", "window_attention_tile"}
    for c in cases:
        assert 0 < c.dims["sparsity"] < 1 and c.dims["ideal_speedup"] > 1
        inputs = c.make_inputs("cpu", torch.float32)
        ours = c.impls["ditkern"](inputs)
        dense = c.impls["sdpa"](inputs)
        assert ours.shape == dense.shape and not torch.allclose(ours, dense, atol=1e-4)  # it is local
        assert c.flops(inputs) > 0 and c.bytes_moved(inputs) > 0
    registry.REGISTRY.clear()


def test_window_for_gives_odd_windows_and_odd_tile_counts():
    assert win_bench.window_for((256, 256), 0.25) == (65, 65)
    assert win_bench.window_for((21, 45, 80), 0.25) == (3, 11, 21)
    w = win_bench.window_for((256, 256), 0.25, "tile")
    assert all(x % 8 == 0 and (x // 8) % 2 == 1 for x in w)


def test_linear_cases_agree_with_sana_eager():
    registry.REGISTRY.clear()
    lin_bench.register_cases({"tiny": dict(B=1, S=100, H=2, Dh=16)})
    (case,) = registry.REGISTRY
    inputs = case.make_inputs("cpu", torch.float32)
    assert torch.allclose(case.impls["ditkern"](inputs), case.impls["sana_eager"](inputs), atol=1e-5)
    registry.REGISTRY.clear()


def test_report_computes_fraction_of_ideal():
    from bench.attention_report import table

    env = dict(gpu="X", date="d", git_sha="s", dtype="bf16")
    row = dict(op="window_attention", shape="flux_4096/q25", impl="ditkern", window="65x65", sparsity=0.9,
               ideal_speedup=10.0, ms=1.0, speedup_vs_sdpa=7.5, speedup_vs_flex=2.0)  # fmt: skip
    assert "| 0.75 |" in table({"env": env, "rows": [row]})
