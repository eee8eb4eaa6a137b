"""The bench registry under pytest-benchmark: ``pytest bench/ --benchmark-only`` (compare runs with
``--benchmark-autosave`` / ``--benchmark-compare``). The timed function synchronises the GPU, so each round measures
the kernels and not their launch. Without a GPU the interpreter-sized shapes run on the CPU (a harness check)."""

import pytest
import torch

from bench.registry import load_all

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
CASES = load_all(quick=not GPU)
IMPLS = sorted({name for c in CASES for name in c.impls})


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{case.op} has no {impl}")
    if not GPU and (impl == "compile" or impl.startswith("ditkern-")):
        pytest.skip("GPU-only implementation")
    inputs = case.make_inputs(DEVICE, DTYPE)
    fn = case.impls[impl]

    def call():
        fn(inputs)
        _sync()

    call()  # warm-up (compilation, autotuning)
    benchmark.group = case.name
    benchmark.extra_info.update(bytes_moved=case.bytes_moved(inputs), device=DEVICE, dtype=str(DTYPE))
    benchmark(call)
