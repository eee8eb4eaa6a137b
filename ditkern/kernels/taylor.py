"""Triton kernels for cached-block Taylor extrapolation (TaylorSeer, arXiv 2503.06923; confidence-gated Taylor,
arXiv 2508.02240).

The state of one cached feature is its Newton divided differences at the last full steps, per batch item:
    d0 = f[t_k],  d1 = f[t_{k-1}, t_k],  d2 = f[t_{k-2}, t_{k-1}, t_k]
Update with a freshly computed feature f = x - base at t_{k+1} (in place, one pass):
    d1' = (f - d0) * c1,  d2' = (d1' - d1) * c2,  d0' = f       with c1 = 1/(t_{k+1}-t_k), c2 = 1/(t_{k+1}-t_{k-1})
(c = 0 while fewer points exist, which zeroes the higher orders). Forecast at t (one pass, residual added):
    out = base + d0 + a1 * d1 + a2 * d2                         with a1 = t - t_k, a2 = (t - t_k)(t - t_{k-1})
This is Newton's interpolating polynomial through the last order+1 full steps, exact for feature trajectories that
are polynomials of degree <= order, for any (non-uniform) timestep spacing.
Layout: every tensor is ``[B, N]`` (a batch item's feature flattened, unit stride); coefficients are ``[B]`` fp32;
``mask[b] = 0`` leaves item b's state untouched (items are isolated: each decides for itself).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _taylor_update_fwd_kernel(
    X, BASE, D0, D1, D2, C1, C2, MASK, N,
    stride_x, stride_base, stride_d,
    ORDER: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)
    i_b = tl.program_id(1)
    if tl.load(MASK + i_b) != 0:
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        row = i_b.to(tl.int64)
        b_f = tl.load(X + row * stride_x + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_BASE:
            b_f = b_f - tl.load(BASE + row * stride_base + o_n, mask=m_n, other=0.0).to(tl.float32)
        p_d = row * stride_d + o_n
        if ORDER >= 1:
            b_d0 = tl.load(D0 + p_d, mask=m_n, other=0.0).to(tl.float32)
            b_d1 = (b_f - b_d0) * tl.load(C1 + i_b)
            if ORDER >= 2:
                b_d1_old = tl.load(D1 + p_d, mask=m_n, other=0.0).to(tl.float32)
                b_d2 = (b_d1 - b_d1_old) * tl.load(C2 + i_b)
                tl.store(D2 + p_d, b_d2.to(D2.dtype.element_ty), mask=m_n)
            tl.store(D1 + p_d, b_d1.to(D1.dtype.element_ty), mask=m_n)
        tl.store(D0 + p_d, b_f.to(D0.dtype.element_ty), mask=m_n)


@triton.jit
def _taylor_forecast_fwd_kernel(
    BASE, D0, D1, D2, A1, A2, OUT, N,
    stride_base, stride_d, stride_out,
    ORDER: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0)
    i_b = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    row = i_b.to(tl.int64)
    p_d = row * stride_d + o_n
    b_o = tl.load(D0 + p_d, mask=m_n, other=0.0).to(tl.float32)
    if ORDER >= 1:
        b_o += tl.load(A1 + i_b) * tl.load(D1 + p_d, mask=m_n, other=0.0).to(tl.float32)
    if ORDER >= 2:
        b_o += tl.load(A2 + i_b) * tl.load(D2 + p_d, mask=m_n, other=0.0).to(tl.float32)
    if HAS_BASE:
        b_o += tl.load(BASE + row * stride_base + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + o_n, b_o.to(OUT.dtype.element_ty), mask=m_n)


def _grid(B: int, N: int) -> tuple[int, int]:
    """Feature chunks on axis 0 (up to 2**31 - 1 programs), batch items on axis 1 (<= 65535): at Wan 720p one item
    is N = 75,600 x 5,120 = 387M elements, 378,000 chunks, over the 65,535 limit of axes 1 and 2."""
    if B > 65535:
        raise ValueError(f"taylor kernels: batch size {B} exceeds the 65535 programs of grid axis 1")
    return (triton.cdiv(N, BLOCK), B)


def taylor_update_triton(x, base, d0, d1, d2, c1, c2, mask, order: int) -> None:
    B, N = x.shape
    grid = _grid(B, N)
    _taylor_update_fwd_kernel[grid](
        x, base if base is not None else x, d0, d1 if d1 is not None else d0, d2 if d2 is not None else d0,
        c1, c2, mask, N, x.stride(0), base.stride(0) if base is not None else 0, d0.stride(0),
        ORDER=order, HAS_BASE=base is not None, BLOCK_N=BLOCK, num_warps=4,
    )  # fmt: skip


def taylor_forecast_triton(base, d0, d1, d2, a1, a2, out, order: int) -> None:
    B, N = d0.shape
    grid = _grid(B, N)
    _taylor_forecast_fwd_kernel[grid](
        base if base is not None else d0, d0, d1 if d1 is not None else d0, d2 if d2 is not None else d0,
        a1, a2, out, N, base.stride(0) if base is not None else 0, d0.stride(0), out.stride(0),
        ORDER=order, HAS_BASE=base is not None, BLOCK_N=BLOCK, num_warps=4,
    )  # fmt: skip
