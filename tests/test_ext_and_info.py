"""The optional CUDA extension (built where nvcc exists), its error path without a GPU, `ditkern info`, and the
promise that `import ditkern` initialises no CUDA and imports neither triton nor diffusers."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ditkern._ext import ext, ext_missing

# Where nvcc exists the install builds the extension (unless told not to): then it must import and work.
NVCC = shutil.which("nvcc") is not None and os.environ.get("DITKERN_SKIP_CUDA_BUILD", "0") != "1"


def test_import_is_light():
    code = (
        "import sys, torch, ditkern; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'triton' not in sys.modules and 'diffusers' not in sys.modules, sorted(m for m in sys.modules if m in ('triton', 'diffusers'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not NVCC, reason="nvcc not on PATH (or DITKERN_SKIP_CUDA_BUILD=1): installed without the extension")
def test_extension_was_built_and_imports():
    assert ext_missing() is None, ext_missing()
    code, message, count = ext().cuda_status()
    assert isinstance(message, str) and message
    assert ext().cuda_runtime_version() >= 12000


@pytest.mark.skipif(not NVCC or torch.cuda.is_available(), reason="checks the GPU-less error path")
def test_extension_call_without_gpu_raises_clear_error():
    with pytest.raises(RuntimeError, match=r"ditkern\._C\.adaln_modulate: CUDA error \d+"):
        ext().adaln_modulate(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 64, [0] * 14, 0, 0, 0, 1e-6, 0, 0)


@pytest.mark.skipif(not NVCC, reason="needs the extension")
def test_extension_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strides must have 14 entries"):
        ext().adaln_modulate(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 64, [0] * 3, 0, 0, 0, 1e-6, 0, 0)
    with pytest.raises(ValueError, match="modulation dtype must be fp32 or x's dtype"):
        ext().adaln_modulate(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 64, [0] * 14, 1, 2, 0, 1e-6, 0, 0)


def test_missing_extension_stub_raises(monkeypatch):
    from ditkern import _ext

    stub = _ext._Missing(ImportError("No module named 'ditkern._C'"))
    with pytest.raises(RuntimeError, match="ditkern was built without CUDA"):
        stub.adaln_modulate()


def test_info_reports_backends_and_reasons(capsys):
    import ditkern

    text = ditkern.info()
    assert "torch" in text and "ditkern._C" in text
    assert "adaln_modulate" in text
    if not torch.cuda.is_available():
        assert "cuda    cannot: " in text
    out = subprocess.run([sys.executable, "-m", "ditkern", "info"], capture_output=True, text=True, check=True).stdout
    assert "ops (backend order cuda -> triton -> torch" in out
