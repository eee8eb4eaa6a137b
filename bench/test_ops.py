"""The bench registry under pytest-benchmark: ``pytest bench/ --benchmark-only`` (compare runs with
``--benchmark-autosave`` / ``--benchmark-compare``). The timed function synchronises the GPU, so each round measures
the kernels and not their launch; like ``python -m bench.run`` it takes the next of several input sets each round
(weights included, more than twice the L2 in all), so no round finds its inputs in cache. Without a GPU the
interpreter-sized shapes run on the CPU (a harness check, one input set)."""

import pytest
import torch

from bench.registry import load_all
from bench.run import input_sets, rotating

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
    sets = input_sets(case, DEVICE, DTYPE)
    step = rotating(case.impls[impl], sets)

    def call():
        step()
        _sync()

    call()  # warm-up (compilation, autotuning)
    benchmark.group = case.name
    benchmark.extra_info.update(
        bytes_moved=case.bytes_moved(sets[0]), input_sets=len(sets), device=DEVICE, dtype=str(DTYPE)
    )
    benchmark(call)
