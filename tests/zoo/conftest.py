import pytest
import torch

import ditkern.zoo as zoo


@pytest.fixture(scope="session")
def dit():
    return zoo.load("digits-dit")


@pytest.fixture(scope="session")
def flux():
    return zoo.load("digits-flux")


# The per-pipeline tests run on the shallow pipelines only (CI time); the deep ones have one cheap test of their own
# (tests/zoo/test_pipelines.py::test_deep_pipelines_load_and_generate).
@pytest.fixture(scope="session", params=zoo.FAST_NAMES)
def pipe(request, dit, flux):
    return {"digits-dit": dit, "digits-flux": flux}[request.param]


@pytest.fixture(autouse=True)
def _threads():
    # These models are tiny: one thread is as fast as two for them and does not stall when the other core is busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
