"""Access to the optional compiled extension ``ditkern._C``.

Import failure (the package was installed without nvcc, or with DITKERN_SKIP_CUDA_BUILD=1) gives a stub whose every
function raises "ditkern was built without CUDA: ...". Only ImportError is caught: a broken build that raises anything
else surfaces as it is.

Whether the extension can run on a GPU is decided twice, both lazily inside ``cuda_can_run_on`` (so ``import
ditkern`` initialises no CUDA): first from what it was built with (``_C.build_info()``: SASS architectures and PTX,
judged by ``image_for``), then, once per device, by asking the CUDA runtime to load one of its kernels
(``_C.kernel_image_status``), so a missing image or a PTX the driver cannot JIT becomes a reason instead of a failed
launch.
"""

from __future__ import annotations

import functools
import re

import torch


class _Missing:
    def __init__(self, error: ImportError):
        self._error = error

    def __getattr__(self, name):
        def _raise(*args, **kwargs):
            raise RuntimeError(
                f"ditkern was built without CUDA: ditkern._C.{name} is unavailable ({self._error}). "
                "Reinstall with nvcc on PATH (pip install --no-build-isolation -e .) to build it."
            )

        return _raise


@functools.lru_cache(maxsize=None)
def ext():
    try:
        from ditkern import _C  # noqa: PLC0415
    except ImportError as error:
        return _Missing(error)
    return _C


def ext_missing() -> str | None:
    """Reason the extension cannot be used at all, or None."""
    e = ext()
    if isinstance(e, _Missing):
        return f"ditkern._C is not built ({e._error})"
    return None


_ARCH = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([af]?)$")

# cudaErrorInvalidDeviceFunction, cudaErrorNoKernelImageForDevice: no SASS for the device and no PTX that JITs to it.
_NO_IMAGE_ERRORS = (98, 209)
_ERROR_HINTS = {
    35: "the NVIDIA driver is older than the CUDA runtime ditkern._C was built with; update the driver",
    222: "the driver cannot JIT the embedded PTX (it is newer than the driver); update the driver, or reinstall "
    "with DITKERN_CUDA_ARCH naming this GPU so no JIT is needed",
}


def _arch(name: str) -> tuple[tuple[int, int], str]:
    m = _ARCH.match(str(name).strip().lower())
    if not m:
        raise ValueError(f"not a CUDA architecture: {name!r}")
    number = int(m.group(1))
    return (number // 10, number % 10), m.group(2)


def image_for(capability: tuple[int, int], archs: list[str], ptx: list[str]) -> str | None:
    """Reason a build with SASS for ``archs`` (``["80", "89", "90a", "100a"]``) and PTX ``ptx`` (``["100"]``) has no
    kernel image a device of ``capability`` can run, or None.

    SASS ``sm_XY`` runs on X.y for y >= Y (same major); ``sm_XYa`` only on exactly X.Y (arch-specific features such as
    wgmma); ``sm_XYf`` on the X family with minor >= Y. PTX ``compute_XY`` is JIT-compiled on every capability >= X.Y;
    arch-specific PTX does not JIT forward, so it counts only for its own capability (family PTX: its family)."""
    cap = (int(capability[0]), int(capability[1]))
    for name in archs:
        (major, minor), suffix = _arch(name)
        if (suffix == "a" and cap == (major, minor)) or (suffix != "a" and cap[0] == major and cap[1] >= minor):
            return None
    for name in ptx:
        (major, minor), suffix = _arch(name)
        if (not suffix and cap >= (major, minor)) or (suffix == "a" and cap == (major, minor)):
            return None
        if suffix == "f" and cap[0] == major and cap[1] >= minor:
            return None
    built = _built_for(archs, ptx)
    return f"ditkern._C has no kernel image for compute capability {cap} ({built}): {_reinstall(cap, archs)}"


def _built_for(archs: list[str], ptx: list[str]) -> str:
    sass = ", ".join(f"sm_{a}" for a in archs) or "no SASS"
    return f"built for {sass}; " + (", ".join(f"PTX compute_{p}" for p in ptx) if ptx else "no PTX")


def _reinstall(cap: tuple[int, int], archs: list[str]) -> str:
    wanted = ";".join([*archs, f"{cap[0]}{cap[1]}"])
    return f'reinstall with DITKERN_CUDA_ARCH="{wanted}" (pip install --no-build-isolation -e .)'


@functools.lru_cache(maxsize=None)
def _image_reason(index: int) -> str | None:
    """Reason ditkern._C's kernels cannot load on cuda:<index>, or None; asked once per device."""
    from ditkern._backend import cuda_capability

    cap = cuda_capability(index)
    e = ext()
    info = e.build_info() if hasattr(e, "build_info") else None  # an extension built before build_info existed
    if info is not None and not info["archs"]:  # compiled outside setup.py, which defines the lists
        info = None
    if info is not None:
        reason = image_for(cap, info["archs"], info["ptx"])
        if reason:
            return reason
    if not hasattr(e, "kernel_image_status"):
        return None
    code, message, _sass, _ptx = e.kernel_image_status(index)
    if code == 0:
        return None
    built = f" ({_built_for(info['archs'], info['ptx'])})" if info is not None else ""
    if code in _NO_IMAGE_ERRORS:
        archs = info["archs"] if info is not None else []
        return (
            f"ditkern._C has no kernel image for compute capability {cap}{built}: the CUDA runtime says {message}; "
            f"{_reinstall(cap, archs)}"
        )
    hint = _ERROR_HINTS.get(code, "its kernels would fail to launch")
    return f"ditkern._C cannot load its kernels on cuda:{index}{built}: CUDA error {code} ({message}); {hint}"


def cuda_can_run_on(*tensors: torch.Tensor, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    """Reason the CUDA backend cannot run on these tensors, or None: no extension, not CUDA tensors, a capability
    below ``min_capability``, or no kernel image for this GPU (see ``image_for`` and ``_image_reason``)."""
    reason = ext_missing()
    if reason:
        return reason
    dev = tensors[0].device
    if dev.type != "cuda":
        return f"tensors are on {dev.type}, not cuda"
    from ditkern._backend import cuda_capability

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = cuda_capability(index)
    if cap < min_capability:
        return f"needs compute capability >= {min_capability}, device has {cap}"
    return _image_reason(index)


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODE[dtype]
