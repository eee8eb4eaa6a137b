"""Triton adaLN-modulate with a fused per-token FP8 epilogue: one read of x gives the modulated row and its FP8 form.

    out      = norm(x) * weight + bias, then * (1 + scale) + shift     (fp32 statistics, stored in OUT's dtype)
    sx[r]    = absmax(out[r]) / grid_max                               (of the stored, rounded row)
    xq[r, :] = RNE_grid(out[r, :] / sx[r])  as E4M3                    (grid E4M3, or FP6 for FP4DiT's A6)

exactly what ``quantize_fp8(adaln_modulate(x, ...))`` computes, without reading ``out`` back: the row stays in
registers (D <= MAX_BLOCK_D). The norm + modulate part is ``ditkern.kernels.adaln_modulate._adaln_rows`` with its
tiling (several rows per program, each row as exact-D chunks of 16-byte vectors per thread); the epilogue takes the
per-row absmax of the stored chunks and quantizes them in registers. The FP8 pair feeds the W4A8/W6A8 GEMM of
every quantized linear layer that consumes this norm's output (FLUX: q/k/v and the single-stream MLP). Layout: x/out
``[B, S, D]`` with unit stride along D, shift/scale as ``[B, S, D]`` views (zero strides broadcast a ``[B, D]``
vector); xq ``[B*S, D]``, sx ``[B*S]``.
DiT adaLN-Zero (arXiv 2212.09748); FP8 per-token scaling as in FP4DiT (arXiv 2503.15465).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ditkern.kernels.adaln_modulate import MAX_BLOCK_D, _adaln_rows, row_config
from ditkern.kernels.fpx_common import round_to_grid, to_e4m3

__all__ = ["MAX_BLOCK_D", "adaln_modulate_fp8_triton"]


@triton.jit
def _adaln_modulate_fp8_fwd_kernel(
    X, SHIFT, SCALE, W, BIAS, OUT, XQ, SX,
    N_ROWS, S, D,
    stride_xb, stride_xs, stride_shb, stride_shs, stride_scb, stride_scs, stride_ob, stride_os, stride_qm,
    eps,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    outs = _adaln_rows(
        X, X, X, SHIFT, SCALE, W, BIAS, OUT, OUT, N_ROWS, S, D,
        stride_xb, stride_xs, 0, 0, 0, 0, stride_shb, stride_shs, stride_scb, stride_scs, stride_ob, stride_os,
        stride_ob, stride_os, eps,
        False, False, HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS, IS_RMS, BLOCK_R, BLOCK_C, N_CHUNKS, EVEN_D,
    )  # fmt: skip
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_r = (o_r < N_ROWS)[:, None]
    o_c = tl.arange(0, BLOCK_C)[None, :]
    # the FP8 epilogue quantizes the rows as stored (rounded), so it equals quantize_fp8(out) bit for bit
    # absmax as the integer max of |v|'s bit patterns: for non-negative floats the integer order is the float order,
    # and every NaN pattern lies above +inf's, so a row holding NaN gets a NaN absmax as torch's amax gives (a float
    # max on the GPU ignores NaN operands) - one row reduction instead of a max and a NaN flag
    b_amax = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    vs = ()
    for c in tl.static_range(N_CHUNKS):
        b_v = outs[c].to(tl.float32)
        if not EVEN_D:
            b_v = tl.where(c * BLOCK_C + o_c < D, b_v, 0.0)
        b_amax = tl.maximum(b_amax, b_v.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        vs = vs + (b_v,)
    amax = tl.max(b_amax, axis=1).to(tl.float32, bitcast=True)  # [BLOCK_R]
    sx = tl.where(amax == 0, 1.0, tl.div_rn(amax, MAXV))
    tl.store(SX + o_r, sx, mask=o_r < N_ROWS)
    b_sx = sx[:, None] + tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    p_q = XQ + o_r.to(tl.int64)[:, None] * stride_qm
    for c in tl.static_range(N_CHUNKS):
        o_d = c * BLOCK_C + o_c
        b_q = round_to_grid(tl.div_rn(vs[c], b_sx), MAN, EMIN, MAXV, False)
        tl.store(p_q + o_d, to_e4m3(b_q), mask=m_r if EVEN_D else m_r & (o_d < D))


def adaln_modulate_fp8_triton(x, shift, scale, weight, bias, out, xq, sx, *, is_rms: bool, eps: float, grid) -> None:
    """``shift``/``scale`` are ``[B, S, D]`` views (or None); see ``ditkern.ops.adaln_modulate_fp8``."""
    B, S, D = x.shape
    block_r, block_c, n_chunks, num_warps = row_config(D, x.element_size(), B * S)

    def st(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    _adaln_modulate_fp8_fwd_kernel[(triton.cdiv(B * S, block_r),)](
        x, shift if shift is not None else x, scale if scale is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, out, xq, sx,
        B * S, S, D, *st(x), *st(shift), *st(scale), *st(out), xq.stride(0), eps,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, IS_RMS=is_rms, MAN=grid.man_bits, EMIN=grid.emin, MAXV=grid.max,
        BLOCK_R=block_r, BLOCK_C=block_c, N_CHUNKS=n_chunks, EVEN_D=n_chunks * block_c == D, num_warps=num_warps,
    )  # fmt: skip
