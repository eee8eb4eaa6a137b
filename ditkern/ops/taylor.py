"""Fused Taylor-extrapolation ops for cached DiT blocks (TaylorSeer, arXiv 2503.06923; confidence-gated Taylor,
"Forecasting When to Forecast", arXiv 2508.02240).

``taylor_update(x, d0, d1, d2, c1, c2, mask, base=None, order)``: in place, for each batch item b with mask[b] != 0,
    f = x - base;  d1' = (f - d0) * c1[b];  d2' = (d1' - d1) * c2[b];  d0' = f
``taylor_forecast(d0, d1, d2, a1, a2, base=None, order)`` -> ``base + d0 + a1[b] * d1 + a2[b] * d2``

d0/d1/d2 are Newton divided differences of the feature over the last full steps (see ditkern/kernels/taylor.py for
the derivation): with c1 = 1/(t_new - t_k), c2 = 1/(t_new - t_{k-1}) and a1 = t - t_k, a2 = (t - t_k)(t - t_{k-1})
the forecast is the interpolating polynomial through the last order+1 full steps, exact for polynomial trajectories
under any timestep spacing. Shapes: x/base/d* are ``[B, ...]`` (same shape), coefficients ``[B]`` fp32, mask ``[B]``
int32. The state may be kept in a lower precision than x (bf16 by default on GPU); arithmetic is fp32.
"""

from __future__ import annotations

import torch

from ditkern._backend import choose, requested_backend, triton_can_run_on
from ditkern._ext import cuda_can_run_on, dtype_code, ext, stream_of

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_ORDER = 2


# ---- reference -------------------------------------------------------------------------------------------------------
def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.float().view(-1, *([1] * (like.dim() - 1)))


def taylor_update_ref(x, d0, d1, d2, c1, c2, mask, *, base=None, order: int) -> None:
    f = x.float() - base.float() if base is not None else x.float()
    m = mask.view(-1, *([1] * (x.dim() - 1))) != 0
    if order >= 1:
        n1 = (f - d0.float()) * _col(c1, x)
        if order >= 2:
            d2.copy_(torch.where(m, (n1 - d1.float()) * _col(c2, x), d2.float()))
        d1.copy_(torch.where(m, n1, d1.float()))
    d0.copy_(torch.where(m, f, d0.float()))


def taylor_forecast_ref(d0, d1, d2, a1, a2, *, base=None, order: int, out_dtype=None) -> torch.Tensor:
    out = d0.float()
    if order >= 1:
        out = out + _col(a1, d0) * d1.float()
    if order >= 2:
        out = out + _col(a2, d0) * d2.float()
    if base is not None:
        out = out + base.float()
    out = out.to(out_dtype or (base.dtype if base is not None else d0.dtype))
    return out.clone() if out.data_ptr() == d0.data_ptr() else out  # order 0 without base: never alias the state


# ---- validation -----------------------------------------------------------------------------------------------------
def _check(order, shape_like, device, named: dict, coeffs: dict):
    if not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in 0..{MAX_ORDER}, got {order!r}")
    B = shape_like.shape[0]
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the state is on {device}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.shape != shape_like.shape:
            raise ValueError(f"{name} must have shape {tuple(shape_like.shape)}, got {tuple(t.shape)}")
    for name, t in coeffs.items():
        if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.device != device:
            raise ValueError(f"{name} must be a [B]={B} tensor on {device}, got {getattr(t, 'shape', type(t).__name__)}")


def _rows(t):
    return None if t is None else t.reshape(t.shape[0], -1)


# ---- backends -------------------------------------------------------------------------------------------------------
def _cuda_can_run(*tensors) -> str | None:
    reason = cuda_can_run_on(tensors[0])
    if reason:
        return reason
    ts = [t for t in tensors if t is not None and t.dim() > 1]
    if len({t.dtype for t in ts}) != 1:
        return "the CUDA kernel needs one dtype for the feature, base and state (the Triton kernel mixes them)"
    vec = 16 // ts[0].element_size()
    for t in ts:
        if not t.is_contiguous() or t.data_ptr() % 16 or t[0].numel() % vec:
            return "a tensor is not contiguous, 16-byte aligned and a whole number of 16-byte vectors per item"
    return None


def _triton_can_run(*tensors) -> str | None:
    reason = triton_can_run_on(tensors[0])
    if reason:
        return reason
    t = tensors[0]
    B, N = t.shape[0], t[0].numel() if t.dim() > 1 else 1
    if B > 65535:  # batch items are grid axis 1 (kernels/taylor.py)
        return f"batch size {B} exceeds the 65535 programs of grid axis 1"
    if N >= 2**31 - 1024:  # element offsets inside an item are int32
        return f"{N} elements per batch item exceed the kernel's int32 offsets"
    return None


BACKENDS = {"cuda": _cuda_can_run, "triton": _triton_can_run, "torch": lambda *t: None}
OP_NAMES = "taylor_update / taylor_forecast"


def info_sample(device, dtype):
    return (torch.empty(2, 4096, device=device, dtype=dtype),)


def _cuda_launch(kind: str, order: int, tensors: dict, coeffs: dict, B: int, N: int):
    def p(t):
        return t.data_ptr() if t is not None else 0

    ref = next(t for t in tensors.values() if t is not None)
    fn = ext().taylor_update if kind == "update" else ext().taylor_forecast
    fn(
        *(p(tensors[k]) for k in ("x", "base", "d0", "d1", "d2", "out")),
        *(p(coeffs[k]) for k in ("c1", "c2", "mask")),
        B, N, order, dtype_code(ref.dtype), stream_of(ref),
        ref.device.index if ref.device.index is not None else torch.cuda.current_device(),
    )  # fmt: skip


# ---- custom ops -----------------------------------------------------------------------------------------------------
@torch.library.custom_op("ditkern::taylor_update", mutates_args=("d0", "d1", "d2"))
def _taylor_update_op(
    x: torch.Tensor,
    base: torch.Tensor | None,
    d0: torch.Tensor,
    d1: torch.Tensor | None,
    d2: torch.Tensor | None,
    c1: torch.Tensor,
    c2: torch.Tensor,
    mask: torch.Tensor,
    order: int,
    backend: str,
) -> None:
    name = choose("taylor_update", BACKENDS, d0, x, base, d1, d2, backend=backend)
    if name == "torch":
        return taylor_update_ref(x, d0, d1, d2, c1, c2, mask, base=base, order=order)
    rx, rb, r0, r1, r2 = (_rows(t) for t in (x, base, d0, d1, d2))
    if name == "triton":
        from ditkern.kernels.taylor import taylor_update_triton  # noqa: PLC0415

        taylor_update_triton(rx, rb, r0, r1, r2, c1, c2, mask, order)
    else:
        _cuda_launch(
            "update", order, dict(x=rx, base=rb, d0=r0, d1=r1, d2=r2, out=None),
            dict(c1=c1, c2=c2, mask=mask), *r0.shape,
        )  # fmt: skip


@_taylor_update_op.register_fake
def _(x, base, d0, d1, d2, c1, c2, mask, order, backend):
    return None


@torch.library.custom_op("ditkern::taylor_forecast", mutates_args=())
def _taylor_forecast_op(
    base: torch.Tensor | None,
    d0: torch.Tensor,
    d1: torch.Tensor | None,
    d2: torch.Tensor | None,
    a1: torch.Tensor,
    a2: torch.Tensor,
    order: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    same = out_dtype == d0.dtype
    backends = {**BACKENDS, "cuda": lambda *t: _cuda_can_run(*t) or (None if same else "out_dtype is not the state dtype")}
    name = choose("taylor_forecast", backends, d0, base, d1, d2, backend=backend)
    if name == "torch":
        return taylor_forecast_ref(d0, d1, d2, a1, a2, base=base, order=order, out_dtype=out_dtype)
    out = torch.empty(d0.shape, dtype=out_dtype, device=d0.device)
    rb, r0, r1, r2, ro = (_rows(t) for t in (base, d0, d1, d2, out))
    if name == "triton":
        from ditkern.kernels.taylor import taylor_forecast_triton  # noqa: PLC0415

        taylor_forecast_triton(rb, r0, r1, r2, a1, a2, ro, order)
    else:
        _cuda_launch(
            "forecast", order, dict(x=None, base=rb, d0=r0, d1=r1, d2=r2, out=ro),
            dict(c1=a1, c2=a2, mask=None), *r0.shape,
        )  # fmt: skip
    return out


@_taylor_forecast_op.register_fake
def _(base, d0, d1, d2, a1, a2, order, out_dtype, backend):
    return d0.new_empty(d0.shape, dtype=out_dtype)


# ---- public API -----------------------------------------------------------------------------------------------------
def taylor_update(x, d0, d1, d2, c1, c2, mask, *, base=None, order: int, backend: str | None = None) -> None:
    """Refresh the divided differences (d0, d1, d2) of items with ``mask != 0`` from the feature ``x - base``, in
    place. d1 is needed for order >= 1 and d2 for order 2 (pass None otherwise)."""
    _check(order, d0, d0.device, dict(x=x, base=base, d0=d0, d1=d1 if order >= 1 else None, d2=d2 if order >= 2 else None),
           dict(c1=c1, c2=c2, mask=mask))  # fmt: skip
    if order >= 1 and d1 is None or order >= 2 and d2 is None:
        raise ValueError(f"order={order} needs d1{' and d2' if order == 2 else ''}")
    _taylor_update_op(x, base, d0, d1 if order >= 1 else None, d2 if order >= 2 else None,
                      c1.float(), c2.float(), mask.to(torch.int32), order, requested_backend(backend))  # fmt: skip


def taylor_forecast(d0, d1, d2, a1, a2, *, base=None, order: int, out_dtype=None, backend: str | None = None):
    """``base + d0 + a1 * d1 + a2 * d2`` per batch item (terms above ``order`` omitted), in one pass."""
    _check(order, d0, d0.device, dict(base=base, d0=d0, d1=d1 if order >= 1 else None, d2=d2 if order >= 2 else None),
           dict(a1=a1, a2=a2))  # fmt: skip
    out_dtype = out_dtype or (base.dtype if base is not None else d0.dtype)
    return _taylor_forecast_op(base, d0, d1 if order >= 1 else None, d2 if order >= 2 else None,
                               a1.float(), a2.float(), order, out_dtype, requested_backend(backend))  # fmt: skip
