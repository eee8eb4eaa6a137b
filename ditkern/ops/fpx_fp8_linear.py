"""W4A8 / W6A8 linear layer on FP8 tensor cores: per-token FP8 activations x packed FP4/FP6/int4 weights.

``fpx_fp8_linear(x, packed, scales, bias, act="e4m3")`` = ``fpx_fp8_matmul(*quantize_fp8(x, act, inv_smooth), ...)``:

    (xq, sx) = quantize_fp8(x * inv_smooth)             per-token E4M3 (or FP6 grid, FP4DiT's A6) + fp32 scales
    out[m, n] = sx[m] * sum_k xq[m, k] * W_hat[n, k] + bias[n]

with ``W_hat`` as in ``ditkern.ops.fpx_linear``. Every weight code is exact in E4M3, so the FP8 dot loses nothing
beyond the two quantizations; accumulation is fp32, scales are applied in the epilogue. x ``[..., K]`` fp32 / fp16
/ bf16, out ``[..., N]`` in x's dtype. ``fpx_fp8_matmul`` takes an already quantized activation (the adaLN kernel's
fused output). FP8 tensor cores need compute capability >= (8, 9); on older GPUs the patch uses ``fpx_linear``.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, fp8_missing, requested_backend, triton_can_run_on
from ditkern.ops.fpx_linear import _check_x, check_packed, dequantize_ref
from ditkern.ops.quantize_fp8 import quantize_fp8
from ditkern.formats import ACT_GRIDS, FORMATS


def fpx_fp8_matmul_ref(xq, sx, packed, scales, bias=None, *, format: str, group_size: int, in_features: int,
                       out_dtype=torch.float32):  # fmt: skip
    """fp32 ``sx[:, None] * (xq @ W_hat.T) + bias`` in ``out_dtype``."""
    w = dequantize_ref(packed, scales, format=format, group_size=group_size, in_features=in_features)
    out = (xq.float() @ w.T) * sx[:, None]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fpx_fp8_linear_ref(x, packed, scales, bias=None, *, format: str, group_size: int, in_features: int, act="e4m3",
                       inv_smooth=None):  # fmt: skip
    from ditkern.ops.quantize_fp8 import quantize_fp8_ref  # noqa: PLC0415

    xq, sx = quantize_fp8_ref(x, act, inv_smooth)
    out = fpx_fp8_matmul_ref(xq, sx, packed, scales, bias, format=format, group_size=group_size,
                             in_features=in_features, out_dtype=x.dtype)  # fmt: skip
    return out.view(*x.shape[:-1], packed.shape[0])


def _triton_can_run(xq, *others) -> str | None:
    reason = triton_can_run_on(xq)
    if reason:
        return reason
    return fp8_missing(xq.device)


def _torch_can_run(xq, *others) -> str | None:
    return None


BACKENDS = {"triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "fpx_fp8_matmul"


def info_sample(device, dtype):
    return (torch.empty(16, 3072, device=device, dtype=torch.float8_e4m3fn),)


@torch.library.custom_op("ditkern::fpx_fp8_matmul", mutates_args=())
def _fpx_fp8_matmul_op(
    xq: torch.Tensor,
    sx: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    name = choose("fpx_fp8_matmul", BACKENDS, xq, backend=backend)
    if name == "torch":
        return fpx_fp8_matmul_ref(xq, sx, packed, scales, bias, format=format, group_size=group_size,
                                  in_features=in_features, out_dtype=out_dtype)  # fmt: skip
    from ditkern.kernels.fpx_fp8_linear import fpx_fp8_linear_triton  # noqa: PLC0415

    out = torch.empty((xq.shape[0], packed.shape[0]), dtype=out_dtype, device=xq.device)
    fpx_fp8_linear_triton(xq, sx, packed, scales, bias, out, fmt=FORMATS[format], group_size=group_size,
                          K=in_features)  # fmt: skip
    return out


@_fpx_fp8_matmul_op.register_fake
def _(xq, sx, packed, scales, bias, format, group_size, in_features, out_dtype, backend):
    return xq.new_empty((xq.shape[0], packed.shape[0]), dtype=out_dtype)


def fpx_fp8_matmul(
    xq: torch.Tensor,
    sx: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    format: str,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> torch.Tensor:
    """``sx[:, None] * (xq @ W_hat.T) + bias`` for an FP8 activation ``xq`` ``[M, K]`` with per-row scales ``sx``."""
    if not isinstance(xq, torch.Tensor) or xq.dtype != torch.float8_e4m3fn or xq.dim() != 2:
        raise TypeError(f"xq must be a 2-D float8_e4m3fn tensor, got {getattr(xq, 'dtype', type(xq).__name__)}")
    if xq.shape[1] != in_features or xq.stride(1) != 1:
        raise ValueError(f"xq must be [M, K=in_features={in_features}] with unit stride along K, got {tuple(xq.shape)}")
    if not isinstance(sx, torch.Tensor) or sx.dtype != torch.float32 or sx.shape != (xq.shape[0],):
        raise ValueError(f"sx must be float32 [M={xq.shape[0]}], got {getattr(sx, 'dtype', None)} {tuple(sx.shape)}")
    check_packed(packed, scales, bias, format, group_size, in_features, xq.device)
    return _fpx_fp8_matmul_op(xq, sx, packed, scales, bias, format, group_size, in_features, out_dtype,
                              requested_backend(backend))  # fmt: skip


def fpx_fp8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    format: str,
    group_size: int,
    in_features: int,
    act: str = "e4m3",
    inv_smooth: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """W4A8 / W6A8 quantized linear layer; see the module docstring. ``act``: "e4m3", "fp6_e3m2" or "fp6_e2m3"."""
    _check_x(x, in_features, inv_smooth)
    if act not in ACT_GRIDS:
        raise ValueError(f"act={act!r} is not one of {', '.join(ACT_GRIDS)}")
    check_packed(packed, scales, bias, format, group_size, in_features, x.device)
    xq, sx = quantize_fp8(x, act, inv_smooth, backend=backend)
    out = fpx_fp8_matmul(xq, sx, packed, scales, bias, format=format, group_size=group_size, in_features=in_features,
                         out_dtype=x.dtype, backend=backend)  # fmt: skip
    return out.view(*x.shape[:-1], packed.shape[0])
