import pytest
import torch

import ditkern.zoo as zoo


@pytest.fixture(scope="session")
def dit():
    return zoo.load("digits-dit")


@pytest.fixture(scope="session")
def flux():
    return zoo.load("digits-flux")


@pytest.fixture(scope="session", params=zoo.NAMES)
def pipe(request, dit, flux):
    return {"digits-dit": dit, "digits-flux": flux}[request.param]


@pytest.fixture(autouse=True)
def _threads():
    # The suite is timed on 2 cores; keep every test at the same thread count so results and timings are stable.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
