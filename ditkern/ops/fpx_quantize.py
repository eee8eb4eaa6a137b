"""Quantize + pack a weight: ``fpx_quantize(w, format, group_size, scale_dtype) -> QuantizedWeight``.

Absmax per-group scales; the semantics are ``ditkern.quant.formats.quantize`` (the torch reference, also the CPU
path); the Triton kernel (``ditkern/kernels/fpx_quantize.py``) produces the same codes and scales bit for bit, so a
large model is quantized on the GPU in one pass over its weights. w ``[N, K]`` fp32/fp16/bf16; non-finite weights
raise naming ``name``.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, requested_backend, triton_can_run_on
from ditkern.formats import (
    QuantizedWeight,
    check_finite,
    check_group_size,
    check_scale_dtype,
    get_format,
    padded_k,
    quantize,
)

_SCALE_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "e8m0": torch.uint8}


def _triton_can_run(w, *others) -> str | None:
    return triton_can_run_on(w)


def _torch_can_run(w, *others) -> str | None:
    return None


BACKENDS = {"triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "fpx_quantize"


def info_sample(device, dtype):
    return (torch.empty(64, 3072, device=device, dtype=dtype),)


def fpx_quantize(w: torch.Tensor, format: str = "fp4_e2m1", group_size: int = 64, scale_dtype: str = "fp32", *,
                 name: str = "weight", backend: str | None = None) -> QuantizedWeight:  # fmt: skip
    fmt = get_format(format)
    check_group_size(group_size, fmt)
    check_scale_dtype(scale_dtype)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be a 2-D float32/float16/bfloat16 tensor, got {getattr(w, 'shape', w)}")
    check_finite(w, name)
    which = choose("fpx_quantize", BACKENDS, w, backend=requested_backend(backend))
    if which == "torch":
        return quantize(w, fmt.name, group_size, scale_dtype, name=name)
    from ditkern.kernels.fpx_quantize import fpx_quantize_triton  # noqa: PLC0415

    N, K = w.shape
    Kp = padded_k(K, group_size)
    w = w if w.stride(1) == 1 else w.contiguous()
    packed = torch.empty((N, Kp * fmt.bits // 8), dtype=torch.uint8, device=w.device)
    scales = torch.empty((N, Kp // group_size), dtype=_SCALE_TORCH[scale_dtype], device=w.device)
    fpx_quantize_triton(w, packed, scales, fmt=fmt, group_size=group_size)
    return QuantizedWeight(packed, scales, fmt.name, group_size, (N, K))
