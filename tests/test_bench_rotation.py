"""bench.run times each call on the next of several input sets; every set holds its own storage, weights included, so
a memory-bound case (the small-M FP4/FP6 GEMM) cannot find its weights in L2 and report inflated GB/s."""

import torch

from bench import registry
from bench import run as bench_run
from bench.ops import fpx_gemm

H200_L2 = 50 << 20
ACTIVATION_KEYS = {"x", "xq", "sx", "K", "N"}


def _weights(inputs) -> list[torch.Tensor]:
    """Every weight-side tensor of an fpx_gemm input set (bf16, FP4 and FP6 codes + scales, FP8 + scales)."""
    out = []
    for k, v in inputs.items():
        if k not in ACTIVATION_KEYS:
            out += list(v) if isinstance(v, tuple) else [v]
    return out


def _small_m_case():
    registry.REGISTRY.clear()
    fpx_gemm.register_cases({"tiny_M1": dict(M=1, K=256, N=512)})
    (case,) = registry.REGISTRY
    registry.REGISTRY.clear()
    return case


def test_rotation_budget_exceeds_twice_the_h200_l2():
    assert bench_run.L2_BYTES_BOUND > 2 * H200_L2
    assert bench_run.rotation_budget("cpu") == 0  # CPU runs time the harness, not a cache: one set


def test_small_m_gemm_sets_hold_distinct_weights_past_the_budget():
    """The per-iteration weight tensors are distinct storages and together exceed twice the L2. On the H200 the
    rotation spans L2_BYTES_BOUND (256 MB) against a 50 MB L2; this shape is ~200x smaller than FLUX's 3072 x 9216,
    so a 1 MiB stand-in L2 and the budget in the same ratio keep the test at CI size."""
    case = _small_m_case()
    l2 = 1 << 20
    budget = l2 * bench_run.L2_BYTES_BOUND // H200_L2
    sets = bench_run.input_sets(case, "cpu", torch.float32, budget=budget)
    assert len(sets) > 2
    assert len(sets) * case.bytes_moved(sets[0]) >= budget  # what the timed calls touch between two uses of a set
    n_weights = len(_weights(sets[0]))
    ptrs = [{w.untyped_storage().data_ptr() for w in _weights(s)} for s in sets]
    assert all(len(p) == n_weights for p in ptrs)  # no two weights of one set share storage
    assert len(set().union(*ptrs)) == n_weights * len(sets), "weight storages are shared between input sets"
    # the weight bytes the smallest impl (W4: FP4 codes + scales) reads, over the rotation: more than twice the L2
    q4 = sum(s["q4"][0].untyped_storage().nbytes() + s["q4"][1].untyped_storage().nbytes() for s in sets)
    assert q4 > 2 * l2
    assert bench_run.footprint(sets) >= len(sets) * sum(w.untyped_storage().nbytes() for w in _weights(sets[0]))
    # the copies are copies: same values in every set
    for s in sets[1:]:
        torch.testing.assert_close(s["w_bf16"], sets[0]["w_bf16"], atol=0, rtol=0)
        assert torch.equal(s["q4"][0], sets[0]["q4"][0])


def test_each_timed_call_takes_the_next_set():
    case = _small_m_case()
    sets = bench_run.input_sets(case, "cpu", torch.float32, budget=1 << 20)
    seen = []
    call = bench_run.rotating(lambda i: seen.append(i["q4"][0].untyped_storage().data_ptr()), sets)
    for _ in range(2 * len(sets)):
        call()
    order = [s["q4"][0].untyped_storage().data_ptr() for s in sets]
    assert seen == order + order


def test_rotation_memory_is_bounded():
    """A cap on the bytes all sets of one case may hold: a huge weight gets fewer copies (reported in the row)."""
    assert bench_run.rotation_count(nbytes=1 << 20, set_bytes=1 << 20, budget=256 << 20, mem_cap=8 << 30) == 256
    assert bench_run.rotation_count(nbytes=1 << 20, set_bytes=1 << 30, budget=256 << 20, mem_cap=8 << 30) == 8
    assert bench_run.rotation_count(nbytes=1 << 30, set_bytes=1 << 30, budget=256 << 20) == 1
    assert bench_run.rotation_count(nbytes=1, set_bytes=1, budget=0) == 1
