"""Access to the optional compiled extension ``ditkern._C``.

Import failure (the package was installed without nvcc, or with DITKERN_SKIP_CUDA_BUILD=1) gives a stub whose every
function raises "ditkern was built without CUDA: ...". Only ImportError is caught: a broken build that raises anything
else surfaces as it is.
"""

from __future__ import annotations

import functools

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


def cuda_can_run_on(*tensors: torch.Tensor, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    reason = ext_missing()
    if reason:
        return reason
    dev = tensors[0].device
    if dev.type != "cuda":
        return f"tensors are on {dev.type}, not cuda"
    from ditkern._backend import cuda_capability

    cap = cuda_capability(dev.index if dev.index is not None else torch.cuda.current_device())
    if cap < min_capability:
        return f"needs compute capability >= {min_capability}, device has {cap}"
    return None


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODE[dtype]
