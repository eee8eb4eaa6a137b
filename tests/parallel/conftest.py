"""One spawned pool of two gloo ranks for all of tests/parallel (see cp_worker.py for why one)."""

from __future__ import annotations

import socket
import time

import pytest
import torch

WORLD = 2
TIMEOUT_S = 240  # the pool takes ~35 s on two busy cores; a hang past this fails the tests, it does not stall CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cp_results(tmp_path_factory):
    """``[rank0, rank1]``: each a dict scenario name -> what that rank recorded (or {"traceback": ...})."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.parallel import cp_worker

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch was built without torch.distributed / gloo: no multi-process CPU run possible")
    out = tmp_path_factory.mktemp("cp")
    ctx = mp.spawn(cp_worker.main, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} context-parallel ranks did not finish in {TIMEOUT_S} s (a collective hang?)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def scenario(cp_results, request):
    """The per-rank results of the scenario named by the test's ``scenario`` marker, failing with the rank's
    traceback when the scenario raised."""
    name = request.node.get_closest_marker("scenario").args[0]
    per_rank = [r.get(name) for r in cp_results]
    for rank, res in enumerate(per_rank):
        if res is None:
            pytest.fail(f"rank {rank} recorded nothing for scenario {name!r} (an earlier scenario broke the pool?)")
        if "traceback" in res:
            pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{res['traceback']}")
    return per_rank


def pytest_configure(config):
    config.addinivalue_line("markers", "scenario(name): the cp_worker scenario a tests/parallel test judges")
