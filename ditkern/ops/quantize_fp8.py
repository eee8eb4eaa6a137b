"""Per-token dynamic FP8 (E4M3) activation quantization, the first half of the W4A8 / W6A8 GEMM.

``quantize_fp8(x, grid="e4m3", inv_smooth=None) -> (xq, sx)``: x ``[..., K]`` (fp32/fp16/bf16, unit stride along K)
is read once per row; ``xs = x * inv_smooth`` (optional per-channel activation-aware factor, ``[K]`` fp32),
``sx[m] = absmax(xs[m]) / grid_max`` (fp32, ``[M]`` with ``M = prod(x.shape[:-1])``; 1.0 for an all-zero row) and
``xq[m, k] = RNE_grid(xs[m, k] / sx[m])`` as ``torch.float8_e4m3fn`` ``[M, K]``. ``grid``: "e4m3" (A8), or
"fp6_e3m2" / "fp6_e2m3" (FP4DiT's A6: values on an FP6 grid, stored exactly as E4M3). Saturating, no inf/NaN out
for finite x; a row holding NaN comes out NaN (scale and codes), never saturated to finite values. The adaLN kernel can emit the same pair (one read of x); see docs/quant.md.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, fp8_missing, requested_backend, triton_can_run_on
from ditkern.formats import ACT_GRIDS

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _grid_round(v: torch.Tensor, grid) -> torch.Tensor:
    from ditkern.formats import round_to_grid  # noqa: PLC0415

    return round_to_grid(v, grid)


def quantize_fp8_ref(x: torch.Tensor, grid: str = "e4m3", inv_smooth: torch.Tensor | None = None):
    """The semantics, in fp32: returns ``(xq [M, K] float8_e4m3fn, sx [M] float32)``."""
    g = ACT_GRIDS[grid]
    xf = x.reshape(-1, x.shape[-1]).float()
    if inv_smooth is not None:
        xf = xf * inv_smooth.float()[None, :]
    amax = xf.abs().amax(-1)
    # NaN propagates: a row holding NaN has a NaN absmax, hence NaN scale and codes (its GEMM row is NaN anyway)
    sx = torch.where(amax == 0, torch.ones_like(amax), amax / g.max)
    xq = _grid_round(xf / sx[:, None], g)
    return xq.to(torch.float8_e4m3fn).contiguous(), sx.contiguous()


def _check(x, grid, inv_smooth):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    if grid not in ACT_GRIDS:
        raise ValueError(f"grid={grid!r} is not one of {', '.join(ACT_GRIDS)}")
    if inv_smooth is not None:
        if inv_smooth.shape != (x.shape[-1],) or inv_smooth.dtype != torch.float32:
            raise ValueError(
                f"inv_smooth must be float32 [K={x.shape[-1]}], got {inv_smooth.dtype} {tuple(inv_smooth.shape)}"
            )
        if inv_smooth.device != x.device:
            raise ValueError(f"inv_smooth is on {inv_smooth.device} but x is on {x.device}")


def _triton_can_run(x, *others) -> str | None:
    reason = triton_can_run_on(x)
    if reason:
        return reason
    return fp8_missing(x.device)


def _torch_can_run(x, *others) -> str | None:
    return None


BACKENDS = {"triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "quantize_fp8"


def info_sample(device, dtype):
    return (torch.empty(16, 3072, device=device, dtype=dtype),)


@torch.library.custom_op("ditkern::quantize_fp8", mutates_args=())
def _quantize_fp8_op(
    x: torch.Tensor, inv_smooth: torch.Tensor | None, grid: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    name = choose("quantize_fp8", BACKENDS, x, backend=backend)
    if name == "torch":
        return quantize_fp8_ref(x, grid, inv_smooth)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    xq = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    sx = torch.empty((M,), dtype=torch.float32, device=x.device)
    from ditkern.kernels.quantize_fp8 import quantize_fp8_triton  # noqa: PLC0415

    quantize_fp8_triton(x2, inv_smooth, xq, sx, grid=ACT_GRIDS[grid])
    return xq, sx


@_quantize_fp8_op.register_fake
def _(x, inv_smooth, grid, backend):
    M = x.numel() // x.shape[-1]
    return x.new_empty((M, x.shape[-1]), dtype=torch.float8_e4m3fn), x.new_empty((M,), dtype=torch.float32)


def quantize_fp8(
    x: torch.Tensor, grid: str = "e4m3", inv_smooth: torch.Tensor | None = None, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization of ``x`` ``[..., K]`` -> ``(xq [M, K] float8_e4m3fn, sx [M] float32)``."""
    _check(x, grid, inv_smooth)
    return _quantize_fp8_op(x, inv_smooth, grid, requested_backend(backend))
