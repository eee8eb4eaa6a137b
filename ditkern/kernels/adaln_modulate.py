"""Triton kernels for fused adaLN-modulate and gated-residual + adaLN-modulate.

Formula (DiT, arXiv 2212.09748, adaLN-Zero; FLUX / SD3 / PixArt / Wan use the same form):
    h   = x + gate * y                       (only with HAS_RESIDUAL; gate optional)
    n   = norm(h) * weight + bias            (layer norm or RMS norm, statistics in fp32; weight/bias optional)
    out = n * (1 + scale) + shift            (scale/shift optional)
Layout: x, y, h, out are ``[B, S, D]`` with unit stride along D and any row strides; gate/shift/scale are given as
``[B, S, D]`` views whose batch and token strides may be 0 (a ``[B, D]`` modulation vector broadcast over tokens),
so the strided chunks of a ``[B, 6*D]`` modulation tensor are read in place. One program normalises one row; the
whole row sits in registers, so x is read once and each output written once (the memory-bound ideal).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK_D = 16384  # a row beyond this no longer fits in registers; the op falls back to torch


@triton.jit
def _adaln_modulate_fwd_kernel(
    X,
    Y,
    GATE,
    SHIFT,
    SCALE,
    W,
    BIAS,
    H_OUT,
    OUT,
    S,
    D,
    stride_xb,
    stride_xs,
    stride_yb,
    stride_ys,
    stride_gb,
    stride_gs,
    stride_shb,
    stride_shs,
    stride_scb,
    stride_scs,
    stride_hb,
    stride_hs,
    stride_ob,
    stride_os,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_row = tl.program_id(0)
    # 64-bit row offsets: B*S*D exceeds 2^31 at video sizes (wan_720p: 75.6k tokens x 5120)
    i_b = (i_row // S).to(tl.int64)
    i_s = (i_row % S).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D

    b_x = tl.load(X + i_b * stride_xb + i_s * stride_xs + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    if HAS_RESIDUAL:
        b_y = tl.load(Y + i_b * stride_yb + i_s * stride_ys + o_d, mask=m_d, other=0.0).to(tl.float32)
        if HAS_GATE:
            b_g = tl.load(GATE + i_b * stride_gb + i_s * stride_gs + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_y = b_y * b_g
        b_h = (b_x + b_y).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + i_b * stride_hb + i_s * stride_hs + o_d, b_h, mask=m_d)
        # normalise the stored (rounded) residual stream, as the unfused model does
        b_x = b_h.to(tl.float32)

    if IS_RMS:
        b_var = tl.sum(b_x * b_x, axis=0) / D
        b_n = b_x * tl.math.rsqrt(b_var + eps)
    else:
        b_mean = tl.sum(b_x, axis=0) / D
        b_c = tl.where(m_d, b_x - b_mean, 0.0)
        b_var = tl.sum(b_c * b_c, axis=0) / D
        b_n = b_c * tl.math.rsqrt(b_var + eps)
    if HAS_WEIGHT:
        b_n = b_n * tl.load(W + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_n = b_n + tl.load(BIAS + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_SCALE:
        b_sc = tl.load(SCALE + i_b * stride_scb + i_s * stride_scs + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_n = b_n * (1.0 + b_sc)
    if HAS_SHIFT:
        b_n = b_n + tl.load(SHIFT + i_b * stride_shb + i_s * stride_shs + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(OUT + i_b * stride_ob + i_s * stride_os + o_d, b_n.to(OUT.dtype.element_ty), mask=m_d)


def _num_warps(block_d: int) -> int:
    # ~8 elements per thread keeps a 16-byte vector per thread per load for 16-bit types
    return max(1, min(16, block_d // 256))


def adaln_modulate_triton(x, y, gate, shift, scale, weight, bias, h_out, out, *, is_rms: bool, eps: float) -> None:
    """Launch on ``[B, S, D]`` tensors prepared by ``ditkern.ops.adaln_modulate`` (mod tensors expanded to 3-D)."""
    B, S, D = x.shape
    block_d = triton.next_power_of_2(D)
    dummy = x  # pointer for absent operands; never dereferenced (constexpr-guarded)

    def st(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    _adaln_modulate_fwd_kernel[(B * S,)](
        x,
        y if y is not None else dummy,
        gate if gate is not None else dummy,
        shift if shift is not None else dummy,
        scale if scale is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        h_out if h_out is not None else out,
        out,
        S,
        D,
        *st(x),
        *st(y),
        *st(gate),
        *st(shift),
        *st(scale),
        *st(h_out),
        *st(out),
        eps,
        HAS_RESIDUAL=y is not None,
        HAS_GATE=gate is not None,
        HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        IS_RMS=is_rms,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
