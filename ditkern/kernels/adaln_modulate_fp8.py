"""Triton adaLN-modulate with a fused per-token FP8 epilogue: one read of x gives the modulated row and its FP8 form.

    out      = norm(x) * weight + bias, then * (1 + scale) + shift     (fp32 statistics, stored in OUT's dtype)
    sx[r]    = absmax(out[r]) / grid_max                               (of the stored, rounded row)
    xq[r, :] = RNE_grid(out[r, :] / sx[r])  as E4M3                    (grid E4M3, or FP6 for FP4DiT's A6)

exactly what ``quantize_fp8(adaln_modulate(x, ...))`` computes, without reading ``out`` back: the row stays in
registers (D <= MAX_BLOCK_D). The FP8 pair feeds the W4A8/W6A8 GEMM of every quantized linear layer that consumes
this norm's output (FLUX: q/k/v and the single-stream MLP). Layout: x/out ``[B, S, D]`` with unit stride along D,
shift/scale as ``[B, S, D]`` views (zero strides broadcast a ``[B, D]`` vector); xq ``[B*S, D]``, sx ``[B*S]``.
DiT adaLN-Zero (arXiv 2212.09748); FP8 per-token scaling as in FP4DiT (arXiv 2503.15465).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ditkern.kernels.fpx_common import round_to_grid, to_e4m3

MAX_BLOCK_D = 16384


@triton.jit
def _adaln_modulate_fp8_fwd_kernel(
    X, SHIFT, SCALE, W, BIAS, OUT, XQ, SX,
    S, D,
    stride_xb, stride_xs, stride_shb, stride_shs, stride_scb, stride_scs, stride_ob, stride_os, stride_qm,
    eps,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0).to(tl.int64)
    i_b, i_s = i_r // S, i_r % S
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_x = tl.load(X + i_b * stride_xb + i_s * stride_xs + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    if IS_RMS:
        b_n = b_x * tl.math.rsqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    else:
        b_c = tl.where(m_d, b_x - tl.sum(b_x, axis=0) / D, 0.0)
        b_n = b_c * tl.math.rsqrt(tl.sum(b_c * b_c, axis=0) / D + eps)
    if HAS_WEIGHT:
        b_n = b_n * tl.load(W + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_n = b_n + tl.load(BIAS + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_SCALE:
        b_n = b_n * (
            1.0 + tl.load(SCALE + i_b * stride_scb + i_s * stride_scs + o_d, mask=m_d, other=0.0).to(tl.float32)
        )
    if HAS_SHIFT:
        b_n = b_n + tl.load(SHIFT + i_b * stride_shb + i_s * stride_shs + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_o = b_n.to(OUT.dtype.element_ty)
    tl.store(OUT + i_b * stride_ob + i_s * stride_os + o_d, b_o, mask=m_d)
    # the FP8 epilogue quantizes the row as stored (rounded), so it equals quantize_fp8(out) bit for bit
    b_v = tl.where(m_d, b_o.to(tl.float32), 0.0)
    # GPU max ignores NaN operands: a row holding NaN gets a NaN absmax explicitly, as torch's amax gives
    has_nan = tl.max((b_v != b_v).to(tl.int32), axis=0) != 0
    amax = tl.where(has_nan, float("nan"), tl.max(tl.abs(b_v), axis=0))
    sx = tl.where(amax == 0, 1.0, tl.div_rn(amax, MAXV))
    tl.store(SX + i_r, sx)
    b_q = round_to_grid(tl.div_rn(b_v, sx + tl.zeros_like(b_v)), MAN, EMIN, MAXV, False)
    tl.store(XQ + i_r * stride_qm + o_d, to_e4m3(b_q), mask=m_d)


def adaln_modulate_fp8_triton(x, shift, scale, weight, bias, out, xq, sx, *, is_rms: bool, eps: float, grid) -> None:
    """``shift``/``scale`` are ``[B, S, D]`` views (or None); see ``ditkern.ops.adaln_modulate_fp8``."""
    B, S, D = x.shape
    block_d = triton.next_power_of_2(D)

    def st(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    _adaln_modulate_fp8_fwd_kernel[(B * S,)](
        x, shift if shift is not None else x, scale if scale is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, out, xq, sx,
        S, D, *st(x), *st(shift), *st(scale), *st(out), xq.stride(0), eps,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, IS_RMS=is_rms, MAN=grid.man_bits, EMIN=grid.emin, MAXV=grid.max,
        BLOCK_D=block_d, num_warps=max(1, min(16, block_d // 256)),
    )  # fmt: skip
