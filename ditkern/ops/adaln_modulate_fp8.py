"""adaLN-modulate fused with per-token FP8 quantization of its output (the input side of W4A8 / W6A8 layers).

``adaln_modulate_fp8(x, shift, scale, norm=, weight=, bias=, eps=, grid="e4m3") -> (out, xq, sx)`` with
``out = adaln_modulate(x, shift, scale, ...)`` (x's dtype) and ``(xq, sx) = quantize_fp8(out, grid)``: one read of x
instead of one for the norm and one per quantized consumer. Shapes and dtypes as ``ditkern.ops.adaln_modulate``
(x ``[B, S, D]``; shift/scale ``[B, D]``, ``[B, 1, D]`` or ``[B, S, D]``); xq ``[B*S, D]`` float8_e4m3fn, sx
``[B*S]`` float32.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, fp8_missing, requested_backend, triton_can_run_on
from ditkern.ops.adaln_modulate import _check, _expand, adaln_modulate_ref
from ditkern.ops.quantize_fp8 import quantize_fp8_ref
from ditkern.formats import ACT_GRIDS


def adaln_modulate_fp8_ref(x, shift, scale, *, norm="layer", weight=None, bias=None, eps=1e-6, grid="e4m3"):
    out = adaln_modulate_ref(x, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps)
    xq, sx = quantize_fp8_ref(out, grid)
    return out, xq, sx


def _triton_can_run(x, *others) -> str | None:
    reason = triton_can_run_on(x)
    if reason:
        return reason
    from ditkern.kernels.adaln_modulate_fp8 import MAX_BLOCK_D  # noqa: PLC0415

    if x.shape[-1] > MAX_BLOCK_D:
        return f"D={x.shape[-1]} exceeds the register-resident row limit {MAX_BLOCK_D}"
    return fp8_missing(x.device)


def _torch_can_run(x, *others) -> str | None:
    return None


BACKENDS = {"triton": _triton_can_run, "torch": _torch_can_run}
OP_NAMES = "adaln_modulate_fp8"


def info_sample(device, dtype):
    return (torch.empty(1, 8, 3072, device=device, dtype=dtype),)


@torch.library.custom_op("ditkern::adaln_modulate_fp8", mutates_args=())
def _adaln_modulate_fp8_op(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm: str,
    eps: float,
    grid: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = choose("adaln_modulate_fp8", BACKENDS, x, backend=backend)
    if name == "torch":
        return adaln_modulate_fp8_ref(x, shift, scale, norm=norm, weight=weight, bias=bias, eps=eps, grid=grid)
    from ditkern.kernels.adaln_modulate_fp8 import adaln_modulate_fp8_triton  # noqa: PLC0415

    B, S, D = x.shape
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    xq = torch.empty((B * S, D), dtype=torch.float8_e4m3fn, device=x.device)
    sx = torch.empty((B * S,), dtype=torch.float32, device=x.device)
    adaln_modulate_fp8_triton(x, _expand(shift, B, S, D), _expand(scale, B, S, D), weight, bias, out, xq, sx,
                              is_rms=norm == "rms", eps=eps, grid=ACT_GRIDS[grid])  # fmt: skip
    return out, xq, sx


@_adaln_modulate_fp8_op.register_fake
def _(x, shift, scale, weight, bias, norm, eps, grid, backend):
    B, S, D = x.shape
    return (
        x.new_empty(x.shape),
        x.new_empty((B * S, D), dtype=torch.float8_e4m3fn),
        x.new_empty((B * S,), dtype=torch.float32),
    )


def adaln_modulate_fp8(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    *,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    grid: str = "e4m3",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, xq, sx)``: the modulated norm and its per-token FP8 form; see the module docstring."""
    _check(x, None, None, shift, scale, weight, bias, norm, eps)
    if grid not in ACT_GRIDS:
        raise ValueError(f"grid={grid!r} is not one of {', '.join(ACT_GRIDS)}")
    return _adaln_modulate_fp8_op(x, shift, scale, weight, bias, norm, float(eps), grid, requested_backend(backend))
