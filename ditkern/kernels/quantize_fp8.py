"""Triton per-token dynamic FP8 activation quantization: ``sx[m] = absmax_k(x[m] * inv_smooth) / grid_max``,
``xq[m, k] = RNE_grid((x[m, k] * inv_smooth[k]) / sx[m])`` stored as E4M3.

The grid is E4M3 itself (W4A8/W6A8) or FP6 E3M2 / E2M3 (FP4DiT's A6: values on the FP6 grid, which E4M3 holds
exactly). Rounding is exact integer/power-of-two arithmetic rather than an fp32 -> fp8 cast (which the interpreter
rounds wrongly), and the division is IEEE (``div_rn``), so the result equals the torch reference bit for bit.
One program quantizes one row in two passes over K (absmax, then quantize): x ``[M, K]``, unit stride along K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ditkern.kernels.fpx_common import round_to_grid, to_e4m3


@triton.jit
def _quantize_fp8_fwd_kernel(
    X, INV_SMOOTH, XQ, SX, K, stride_xm, stride_qm,
    MAN: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    i_m = tl.program_id(0).to(tl.int64)
    p_x = X + i_m * stride_xm
    b_amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    b_nan = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for kb in range(0, K, BLOCK_K):
        o_k = kb + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_x + o_k, mask=o_k < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            b_x = b_x * tl.load(INV_SMOOTH + o_k, mask=o_k < K, other=0.0)
        b_amax = tl.maximum(b_amax, tl.abs(b_x))
        b_nan = b_nan | (b_x != b_x).to(tl.int32)
    # GPU max ignores NaN operands: a row holding NaN gets a NaN absmax explicitly, as torch's amax gives
    amax = tl.where(tl.max(b_nan, axis=0) != 0, float("nan"), tl.max(b_amax, axis=0))
    # an all-zero row gets scale 1 (its codes are 0); the division is IEEE so the scale matches torch's
    sx = tl.where(amax == 0, 1.0, tl.div_rn(amax, MAXV))
    tl.store(SX + i_m, sx)
    for kb in range(0, K, BLOCK_K):
        o_k = kb + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_x + o_k, mask=o_k < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            b_x = b_x * tl.load(INV_SMOOTH + o_k, mask=o_k < K, other=0.0)
        b_q = round_to_grid(tl.div_rn(b_x, sx + tl.zeros_like(b_x)), MAN, EMIN, MAXV, False)
        tl.store(XQ + i_m * stride_qm + o_k, to_e4m3(b_q), mask=o_k < K)


def quantize_fp8_triton(x2, inv_smooth, xq, sx, *, grid) -> None:
    """``grid`` is a ``ditkern.quant.formats.Format`` (E4M3, or an FP6 format for A6)."""
    M, K = x2.shape
    block_k = min(4096, triton.next_power_of_2(K))
    _quantize_fp8_fwd_kernel[(M,)](
        x2, inv_smooth if inv_smooth is not None else sx, xq, sx, K, x2.stride(0), xq.stride(0),
        MAN=grid.man_bits, EMIN=grid.emin, MAXV=grid.max, HAS_SMOOTH=inv_smooth is not None, BLOCK_K=block_k,
        num_warps=max(1, min(16, block_k // 256)),
    )  # fmt: skip
