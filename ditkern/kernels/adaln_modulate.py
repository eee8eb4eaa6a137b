"""Triton kernels for fused adaLN-modulate and gated-residual + adaLN-modulate.

Formula (DiT, arXiv 2212.09748, adaLN-Zero; FLUX / SD3 / PixArt / Wan use the same form):
    h   = x + gate * y                       (only with HAS_RESIDUAL; gate optional)
    n   = norm(h) * weight + bias            (layer norm or RMS norm, statistics in fp32; weight/bias optional)
    out = n * (1 + scale) + shift            (scale/shift optional)
Layout: x, y, h, out are ``[B, S, D]`` with unit stride along D and any row strides; gate/shift/scale are given as
``[B, S, D]`` views whose batch and token strides may be 0 (a ``[B, D]`` modulation vector broadcast over tokens),
so the strided chunks of a ``[B, 6*D]`` modulation tensor are read in place.

Tiling (exact D, several rows per program): a program normalises BLOCK_R rows. Each row is held in registers as
N_CHUNKS chunks of BLOCK_C elements, BLOCK_C a power of two chosen so that N_CHUNKS * BLOCK_C covers D exactly where
D allows (FLUX 3072 = 3 x 1024, SD3 1536 = 3 x 512, Wan 5120 = 5 x 1024; PixArt 1152 = 9 x 128 in fp32 and 5 x 256,
90% busy, in 16-bit types, whose 9 chunks would exceed the 5 that bound a thread's registers and the compile time)
instead of padding D to the next power of two (which left 25-44% of the lanes without data). The [BLOCK_R, BLOCK_C]
chunk tile is sized so each thread holds one 16-byte vector of it: every load and store is 16 bytes wide, and a
thread holds N_CHUNKS vectors per tensor. x is read once and each output written once (the memory-bound ideal);
BLOCK_R is chosen so a program moves >= 16 KB. Statistics are the exact two-pass ones over the register-resident
row: the chunk sums are added elementwise (in-thread), one row reduction gives the mean, a second the centred sum of
squares (no E[x^2] - mean^2 cancellation); RMS norm needs only the one sum of squares.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

MAX_BLOCK_D = 16384  # a row beyond this no longer fits in registers; the op falls back to torch
_MAX_THREADS = 512  # 16 warps per program at most
_ELEMENTS_PER_THREAD = 40  # per tensor and thread: 5 chunks of 16-bit vectors (Wan's 5120 = 5 x 1024), 10 of fp32
_TARGET_BYTES = 16384  # x read + out written per program


@functools.lru_cache(maxsize=4096)
def row_config(D: int, elt: int, rows: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, N_CHUNKS, num_warps)`` for rows of D elements of ``elt`` bytes (x's dtype).

    BLOCK_C: the power of two whose chunks pad D least (ties: fewer chunks), with at most ``_ELEMENTS_PER_THREAD``
    elements per thread and a chunk no wider than the program (one 16-byte vector per thread and chunk).
    BLOCK_R: rows per program, so that x read + out written is >= 16 KB and the program has 4-16 warps (fewer rows
    only when the input has fewer)."""
    vec = max(1, 16 // elt)  # elements of one 16-byte vector
    best = None
    c = min(triton.next_power_of_2(D), _MAX_THREADS * vec)
    while c >= 1:
        n = triton.cdiv(D, c)
        if n * min(c, vec) <= _ELEMENTS_PER_THREAD and (best is None or n * c < best[0] * best[1]):
            best = (n, c)
        if c <= vec:
            break
        c //= 2
    n_chunks, block_c = best
    per_row = max(1, block_c // vec)  # threads along one row
    block_r = triton.next_power_of_2(triton.cdiv(_TARGET_BYTES, 2 * D * elt))
    block_r = min(max(block_r, 128 // per_row, 1), max(1, _MAX_THREADS // per_row), triton.next_power_of_2(rows))
    num_warps = max(1, min(16, block_r * per_row // 32))
    return block_r, block_c, n_chunks, num_warps


@triton.jit
def _adaln_rows(
    X, Y, GATE, SHIFT, SCALE, W, BIAS, H_OUT, OUT,
    N_ROWS, S, D,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_gs, stride_shb, stride_shs, stride_scb, stride_scs,
    stride_hb, stride_hs, stride_ob, stride_os,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """The BLOCK_R rows of this program: stores h (with HAS_RESIDUAL) and out, returns the tuple of the N_CHUNKS
    stored ``[BLOCK_R, BLOCK_C]`` out chunks (in OUT's dtype) for an epilogue (the FP8 kernel)."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    # 64-bit row offsets: B*S*D exceeds 2^31 at video sizes (wan_720p: 75.6k tokens x 5120)
    i_b = (o_r // S).to(tl.int64)[:, None]  # [BLOCK_R, 1]
    i_s = (o_r % S).to(tl.int64)[:, None]
    o_c = tl.arange(0, BLOCK_C)[None, :] + tl.zeros([BLOCK_R, 1], dtype=tl.int32)  # [BLOCK_R, BLOCK_C]
    m_rc = (o_r < N_ROWS)[:, None] & (o_c < BLOCK_C)  # [BLOCK_R, BLOCK_C]
    # pointers and masks of chunk 0, built once; chunk c is `p + c * BLOCK_C` (few ops per chunk keep the compile fast)
    p_x = X + i_b * stride_xb + i_s * stride_xs + o_c
    p_y = Y + i_b * stride_yb + i_s * stride_ys + o_c
    p_g = GATE + i_b * stride_gb + i_s * stride_gs + o_c
    p_h = H_OUT + i_b * stride_hb + i_s * stride_hs + o_c
    p_sh = SHIFT + i_b * stride_shb + i_s * stride_shs + o_c
    p_sc = SCALE + i_b * stride_scb + i_s * stride_scs + o_c
    p_o = OUT + i_b * stride_ob + i_s * stride_os + o_c
    # weight/bias as [BLOCK_R, BLOCK_C] loads (rows after the first hit L1): the tile's own layout, where a
    # [1, BLOCK_C] load would be converted through shared memory and lose its 16-byte width
    p_w = W + o_c
    p_b = BIAS + o_c

    b_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    xs = ()
    for c in tl.static_range(N_CHUNKS):
        m = m_rc if EVEN_D else m_rc & (o_c < D - c * BLOCK_C)
        b_x = tl.load(p_x + c * BLOCK_C, mask=m, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
        if HAS_RESIDUAL:
            b_y = tl.load(p_y + c * BLOCK_C, mask=m, other=0.0).to(tl.float32)
            if HAS_GATE:
                b_y = b_y * tl.load(p_g + c * BLOCK_C, mask=m, other=0.0).to(tl.float32)
            b_h = (b_x + b_y).to(H_OUT.dtype.element_ty)
            tl.store(p_h + c * BLOCK_C, b_h, mask=m)
            # normalise the stored (rounded) residual stream, as the unfused model does
            b_x = b_h.to(tl.float32)
        xs = xs + (b_x,)
        if IS_RMS:
            b_acc += b_x * b_x
        else:
            b_acc += b_x

    if IS_RMS:
        b_rstd = tl.math.rsqrt(tl.sum(b_acc, axis=1) / D + eps)[:, None]  # [BLOCK_R, 1]
    else:
        b_mean = (tl.sum(b_acc, axis=1) / D)[:, None]
        b_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            b_c = xs[c] - b_mean
            if not EVEN_D:
                b_c = tl.where(o_c < D - c * BLOCK_C, b_c, 0.0)
            b_acc += b_c * b_c
        b_rstd = tl.math.rsqrt(tl.sum(b_acc, axis=1) / D + eps)[:, None]

    outs = ()
    for c in tl.static_range(N_CHUNKS):
        m_d = o_c < D - c * BLOCK_C
        m = m_rc if EVEN_D else m_rc & m_d
        if IS_RMS:
            b_n = xs[c] * b_rstd
        else:
            b_n = (xs[c] - b_mean) * b_rstd
        if HAS_WEIGHT:
            b_n = b_n * tl.load(p_w + c * BLOCK_C, mask=m_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_n = b_n + tl.load(p_b + c * BLOCK_C, mask=m_d, other=0.0).to(tl.float32)
        if HAS_SCALE:
            b_n = b_n * (1.0 + tl.load(p_sc + c * BLOCK_C, mask=m, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            b_n = b_n + tl.load(p_sh + c * BLOCK_C, mask=m, other=0.0).to(tl.float32)
        b_o = b_n.to(OUT.dtype.element_ty)
        tl.store(p_o + c * BLOCK_C, b_o, mask=m)
        outs = outs + (b_o,)
    return outs


@triton.jit
def _adaln_modulate_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, W, BIAS, H_OUT, OUT,
    N_ROWS, S, D,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_gs, stride_shb, stride_shs, stride_scb, stride_scs,
    stride_hb, stride_hs, stride_ob, stride_os,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    _adaln_rows(
        X, Y, GATE, SHIFT, SCALE, W, BIAS, H_OUT, OUT, N_ROWS, S, D,
        stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_gs, stride_shb, stride_shs, stride_scb,
        stride_scs, stride_hb, stride_hs, stride_ob, stride_os, eps,
        HAS_RESIDUAL, HAS_GATE, HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS, IS_RMS,
        BLOCK_R, BLOCK_C, N_CHUNKS, EVEN_D,
    )  # fmt: skip


def adaln_modulate_triton(x, y, gate, shift, scale, weight, bias, h_out, out, *, is_rms: bool, eps: float) -> None:
    """Launch on ``[B, S, D]`` tensors prepared by ``ditkern.ops.adaln_modulate`` (mod tensors expanded to 3-D)."""
    B, S, D = x.shape
    block_r, block_c, n_chunks, num_warps = row_config(D, x.element_size(), B * S)
    dummy = x  # pointer for absent operands; never dereferenced (constexpr-guarded)

    def st(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    _adaln_modulate_fwd_kernel[(triton.cdiv(B * S, block_r),)](
        x,
        y if y is not None else dummy,
        gate if gate is not None else dummy,
        shift if shift is not None else dummy,
        scale if scale is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        h_out if h_out is not None else out,
        out,
        B * S,
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
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        N_CHUNKS=n_chunks,
        EVEN_D=n_chunks * block_c == D,
        num_warps=num_warps,
    )
