"""Test configuration: Triton kernels run through the interpreter on CPU (set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return "cuda" if HAS_GPU else "cpu"


def start_compile_check():
    """Start ``python -m bench.static --check`` (the GPU-less compile of every Triton kernel for sm_80/89/90a/100a) in
    its own process, without the interpreter; returns ``(Popen, out_dir)``. tests/test_compile.py waits for it."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    out = tempfile.mkdtemp(prefix="ditkern-compile-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.static", "--check", "--no-cuda", "--jobs", "2", "--out", out]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def pytest_collection_finish(session):
    # the compile check takes minutes of CPU: start it first so it runs beside the rest of the suite
    if any(item.nodeid.startswith("tests/test_compile.py::test_compile_") for item in session.items):
        session.config._ditkern_compile_job = start_compile_check()
