"""Triton W4A8 / W6A8 GEMM on FP8 tensor cores: ``out = sx[m] * sum_g s[n, g] * (xq @ E4M3(codes).T)_g + bias``.

``xq`` ``[M, K]`` is the per-token FP8 (E4M3) activation from ``ditkern.ops.quantize_fp8`` with fp32 scales ``sx``
``[M]``. FP4/FP6/int4 codes become their exact E4M3 images in registers by shifts and masks, four bytes per
instruction (``fpx_common.load_e4m3``; the image is ``value * 2**-e4m3_shift``, a power of two folded into the
epilogue; FP6 reads its two bit planes as contiguous bytes), the dot runs on
FP8 tensor cores with fp32 accumulation, and the per-group weight scales (one per K tile: BLOCK_K divides G) and the
per-token activation scales are applied outside the products. No step rounds: the only error is that of quantizing
x to FP8 (or to FP6, FP4DiT's A6) and W to its format. FP4DiT (arXiv 2503.15465); Hopper/Ada FP8 MMA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ditkern.kernels.fpx_common import e4m3_constexprs, load_e4m3, load_scales


@triton.jit
def _fpx_fp8_linear_fwd_kernel(
    XQ, SX, PACKED, SCALES, BIAS, OUT,
    M, N, K, K_pad,
    stride_xm, stride_pn, stride_sn, stride_om,
    post_scale,
    G: tl.constexpr, BITS: tl.constexpr,
    SH: tl.constexpr, SL: tl.constexpr, ASM_LO: tl.constexpr, ASM_HI: tl.constexpr, ASM_F0: tl.constexpr,
    ASM_F1: tl.constexpr, ASM_F2: tl.constexpr, ASM_F3: tl.constexpr, USE_ASM: tl.constexpr,
    SCALE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = o_m < M, o_n < N
    if EVEN_N:  # N a multiple of BLOCK_N: the weight and scale loads need no predicate
        m_n = tl.full((BLOCK_N,), 1, tl.int1)
    p_x = XQ + o_m[:, None].to(tl.int64) * stride_xm
    p_w = PACKED + o_n[:, None].to(tl.int64) * stride_pn
    p_s = SCALES + o_n.to(tl.int64) * stride_sn
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_pad, BLOCK_K):
        o_k = kb + tl.arange(0, BLOCK_K)
        if EVEN_K:  # K == K_pad
            b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_K] e4m3
        else:
            b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < K), other=0.0)
        b_w = load_e4m3(p_w, kb, m_n[:, None], K_pad, BITS, BLOCK_K, SH, SL, ASM_LO, ASM_HI, ASM_F0, ASM_F1, ASM_F2,
                        ASM_F3, USE_ASM)  # [BLOCK_N, BLOCK_K] fmt: skip
        b_p = tl.dot(b_x, tl.trans(b_w))  # [BLOCK_M, BLOCK_N] fp32, exact products
        b_acc += b_p * load_scales(p_s + kb // G, m_n, SCALE_KIND)[None, :]
    b_sx = tl.load(SX + o_m, mask=m_m, other=0.0)
    b_acc = b_acc * (b_sx[:, None] * post_scale)
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_o = OUT + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :]
    tl.store(p_o, b_acc.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def _config(M: int, group_size: int, interpreted: bool) -> dict:
    """Tiles (bench/results/static/<arch>.md). A K tile lies in one scale group (BLOCK_K divides G). On a GPU,
    64 x 128 output tiles with 4 warps: ~180 registers and ~36 KB of shared memory, so three programs share an SM
    and one's tensor-core work overlaps another's decoding and scaling (each step waits for its own MMA: the group
    scale multiplies the step's product). Under the interpreter cost is per program and step: the largest tiles."""
    if interpreted:
        return dict(BLOCK_M=max(16, min(128, triton.next_power_of_2(M))), BLOCK_N=128, BLOCK_K=min(group_size, 128),
                    num_warps=4, num_stages=1)  # fmt: skip
    bm = 64 if M > 32 else max(16, triton.next_power_of_2(M))
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=min(group_size, 128), num_warps=4, num_stages=4)


def fpx_fp8_linear_triton(xq, sx, packed, scales, bias, out, *, fmt, group_size: int, K: int) -> None:
    import torch  # noqa: PLC0415

    from ditkern._backend import triton_interpreted  # noqa: PLC0415
    from ditkern.formats import padded_k, scale_kind  # noqa: PLC0415

    M, N = xq.shape[0], packed.shape[0]
    interp = triton_interpreted()
    cfg = _config(M, group_size, interp)
    kind = scale_kind(scales)
    s = scales.view(torch.int16) if kind == 1 else scales
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _fpx_fp8_linear_fwd_kernel[grid](
        xq, sx, packed, s, bias if bias is not None else out, out,
        M, N, K, padded_k(K, group_size),
        xq.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        float(2.0 ** fmt.e4m3_shift),
        G=group_size, BITS=fmt.bits, **e4m3_constexprs(fmt, use_asm=not interp),
        SCALE_KIND=kind, HAS_BIAS=bias is not None, EVEN_K=padded_k(K, group_size) == K,
        EVEN_N=N % cfg["BLOCK_N"] == 0, **cfg,
    )  # fmt: skip
