"""Weight-only FP4 / FP6 / int4 linear layer: ``fpx_linear(x, packed, scales, bias)``
= ``(x * inv_smooth) @ W_hat.T + bias``.

``W_hat[n, k] = value(code[n, k]) * scale[n, k // group_size]`` (``ditkern/quant/formats.py``: formats, packed layout
``[N, K_pad * bits / 8]`` uint8, scales ``[N, K_pad / G]`` fp32 / bf16 / E8M0-uint8). x ``[..., K]`` in fp32, fp16 or
bf16 with unit stride along K; out ``[..., N]`` in x's dtype. ``inv_smooth`` (``[K]`` fp32, optional) is the
activation-aware per-channel factor of a calibrated layer. Products accumulate in fp32. The path for small M (decode
steps, modulation vectors): the weights are read at 4-6.5 bits instead of 16; at DiT token counts use
``fpx_fp8_linear``.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, max_shared_memory, requested_backend, triton_can_run_on
from ditkern._ext import cuda_can_run_on, dtype_code, ext, stream_of
from ditkern.formats import FORMATS, GROUP_SIZES, check_group_size, get_format, padded_k

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def dequantize_ref(packed, scales, *, format: str, group_size: int, in_features: int) -> torch.Tensor:
    """fp32 ``[N, K]`` ``W_hat`` (no smoothing)."""
    from ditkern.formats import QuantizedWeight  # noqa: PLC0415

    q = QuantizedWeight(packed, scales, format, group_size, (packed.shape[0], in_features))
    return q.dequantize(torch.float32)


def fpx_linear_ref(x, packed, scales, bias=None, *, format: str, group_size: int, in_features: int, inv_smooth=None):
    """The semantics: fp32 ``(x * inv_smooth) @ W_hat.T + bias`` returned in x's dtype."""
    w = dequantize_ref(packed, scales, format=format, group_size=group_size, in_features=in_features)
    xf = x.float()
    if inv_smooth is not None:
        xf = xf * inv_smooth.float()
    out = xf @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def check_packed(packed, scales, bias, format: str, group_size: int, in_features: int, device) -> None:
    """Validation shared by the FP4/FP6 GEMM ops (errors name the argument)."""
    fmt = get_format(format)
    check_group_size(group_size, fmt)
    if not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    kp = padded_k(in_features, group_size)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    N = packed.shape[0]
    want = kp * fmt.bits // 8
    if packed.shape[1] != want:
        raise ValueError(f"packed must be [N, {want}] for {format} with in_features={in_features}, group_size="
                         f"{group_size}, got {tuple(packed.shape)}")  # fmt: skip
    if packed.stride(1) != 1:
        raise ValueError("packed must be contiguous along its last dimension")
    if scales.shape != (N, kp // group_size) or scales.dtype not in (torch.float32, torch.bfloat16, torch.uint8):
        raise ValueError(f"scales must be [N={N}, {kp // group_size}] fp32, bf16 or uint8 (E8M0), got {scales.dtype} "
                         f"{tuple(scales.shape)}")  # fmt: skip
    if scales.stride(1) != 1:
        raise ValueError("scales must be contiguous along its last dimension")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in _FLOATS):
        raise ValueError(f"bias must be a float [N={N}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("packed", packed), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_x(x, in_features, inv_smooth):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., K] with K=in_features={in_features}, got shape {tuple(x.shape)}")
    if inv_smooth is not None and (inv_smooth.shape != (in_features,) or inv_smooth.dtype != torch.float32):
        raise ValueError(
            f"inv_smooth must be float32 [K={in_features}], got {inv_smooth.dtype} {tuple(inv_smooth.shape)}"
        )


CUDA_MAX_M = 16  # the CUDA kernel is the small-M GEMV (adaLN modulation linears: M = batch size)


def _cuda_can_run(x, packed=None, *others) -> str | None:
    reason = cuda_can_run_on(x)
    if reason:
        return reason
    M = x.numel() // x.shape[-1]
    if M > CUDA_MAX_M:
        return (
            f"M={M} rows > {CUDA_MAX_M}: the CUDA kernel is the small-M GEMV (Triton's tensor-core GEMM runs larger M)"
        )
    if packed is not None and (packed.data_ptr() % 16 or packed.stride(0) % 8):
        return "packed is not 16-byte aligned with rows a multiple of 8 bytes (the GEMV's vector loads)"
    smem = cuda_shared_bytes(M, x.shape[-1])
    limit = max_shared_memory(x.device)
    if limit is not None and smem > limit:
        return (
            f"x needs {smem} bytes of shared memory in the CUDA GEMV (M={M}, K={x.shape[-1]}), the device allows "
            f"{limit} (Triton runs it)"
        )
    return None


def cuda_shared_bytes(M: int, K: int) -> int:
    """Upper bound of the CUDA GEMV's shared memory (csrc/fpx/fpx_gemv.cu: x staged as fp32, 36 floats per 32 codes
    of K_pad; K_pad <= K rounded up to the largest group size)."""
    return M * padded_k(K, max(GROUP_SIZES)) // 32 * 36 * 4


def _triton_can_run(x, *others) -> str | None:
    return triton_can_run_on(x)


def _torch_can_run(x, *others) -> str | None:
    return None


BACKENDS = {"cuda": _cuda_can_run, "triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "fpx_linear"


def info_sample(device, dtype):
    return (torch.empty(16, 3072, device=device, dtype=dtype),)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@torch.library.custom_op("ditkern::fpx_linear", mutates_args=())
def _fpx_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    inv_smooth: torch.Tensor | None,
    format: str,
    group_size: int,
    in_features: int,
    backend: str,
) -> torch.Tensor:
    name = choose("fpx_linear", BACKENDS, x, packed, backend=backend)
    if name == "torch":
        return fpx_linear_ref(x, packed, scales, bias, format=format, group_size=group_size, in_features=in_features,
                              inv_smooth=inv_smooth)  # fmt: skip
    if name == "cuda":
        return _launch_cuda(x, packed, scales, bias, inv_smooth, format, group_size, in_features)
    from ditkern.kernels.fpx_linear import fpx_linear_triton  # noqa: PLC0415

    x2 = _rows(x)
    out = torch.empty((x2.shape[0], packed.shape[0]), dtype=x.dtype, device=x.device)
    fpx_linear_triton(x2, packed, scales, bias, inv_smooth, out, fmt=FORMATS[format], group_size=group_size,
                      K=in_features)  # fmt: skip
    return out.view(*x.shape[:-1], packed.shape[0])


def _launch_cuda(x, packed, scales, bias, inv_smooth, format, group_size, in_features):
    from ditkern.formats import scale_kind  # noqa: PLC0415

    fmt = FORMATS[format]
    x2 = _rows(x)
    M, N = x2.shape[0], packed.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.float().contiguous()
    lut = [float(v) for v in fmt.values().tolist()]
    ext().fpx_gemv(
        x2.data_ptr(), packed.data_ptr(), scales.data_ptr(), 0 if b is None else b.data_ptr(),
        0 if inv_smooth is None else inv_smooth.data_ptr(), out.data_ptr(),
        M, N, in_features, padded_k(in_features, group_size),
        [x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0)],
        group_size, fmt.bits, dtype_code(x.dtype), scale_kind(scales), lut,
        stream_of(x), x.device.index if x.device.index is not None else torch.cuda.current_device(),
    )  # fmt: skip
    return out.view(*x.shape[:-1], N)


@_fpx_linear_op.register_fake
def _(x, packed, scales, bias, inv_smooth, format, group_size, in_features, backend):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def fpx_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    format: str,
    group_size: int,
    in_features: int,
    inv_smooth: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weight-only quantized linear layer; see the module docstring. ``backend``: None/auto, "triton" or "torch"."""
    _check_x(x, in_features, inv_smooth)
    check_packed(packed, scales, bias, format, group_size, in_features, x.device)
    return _fpx_linear_op(x, packed, scales, bias, inv_smooth, format, group_size, in_features,
                          requested_backend(backend))  # fmt: skip
