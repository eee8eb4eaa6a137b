"""Triton quantize + pack of FP4/FP6/int4 weights with per-group absmax scales (one program per row x group).

``scale = absmax(w[n, group]) / max(format)`` (1 for an all-zero group), stored as fp32, bf16 (RNE, by bit
arithmetic) or E8M0 (the biased exponent of the smallest power of two >= the scale); ``code = RNE_grid(w / stored)``
with saturation; codes packed in the layout of ``ditkern/formats.py`` (FP4: two a byte, low nibble first; FP6: the
high 4 bits packed like FP4, then the low 2 bits four to a byte). Division is IEEE (``div_rn``) and rounding exact, so codes and scales equal the
torch reference bit for bit. Layout: w ``[N, K]`` with unit stride along K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ditkern.kernels.fpx_common import encode_code, round_to_grid


@triton.jit
def _fpx_quantize_fwd_kernel(
    W, PACKED, SCALES, K, K_pad, stride_wn, stride_pn, stride_sn,
    MAXV: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr,
    IS_INT: tl.constexpr, SCALE_KIND: tl.constexpr,
):  # fmt: skip
    i_n = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1)
    o_k = i_g * G + tl.arange(0, G)
    b_w = tl.load(W + i_n * stride_wn + o_k, mask=o_k < K, other=0.0).to(tl.float32)  # [G]
    amax = tl.max(tl.abs(b_w), axis=0)
    s = tl.where(amax > 0, tl.div_rn(amax, MAXV), 1.0)
    bits = s.to(tl.int32, bitcast=True)
    if SCALE_KIND == 0:
        tl.store(SCALES + i_n * stride_sn + i_g, s)
    elif SCALE_KIND == 1:
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # fp32 -> bf16, round to nearest even
        tl.store(SCALES + i_n * stride_sn + i_g, r.to(tl.int16))
        s = (r << 16).to(tl.float32, bitcast=True)
    else:
        e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil(log2 s)
        e = tl.minimum(tl.maximum(e, -126), 127)
        tl.store(SCALES + i_n * stride_sn + i_g, (e + 127).to(tl.uint8))
        s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    b_q = round_to_grid(tl.div_rn(b_w, s + tl.zeros_like(b_w)), MAN, EMIN, MAXV, IS_INT)
    b_c = encode_code(b_q, BITS, MAN, EMIN, IS_INT)  # [G] int32
    p_row = PACKED + i_n * stride_pn
    if BITS == 4:
        lo, hi = tl.split(tl.reshape(b_c, (G // 2, 2)))
        o_b = i_g * (G // 2) + tl.arange(0, G // 2)
        tl.store(p_row + o_b, (lo | (hi << 4)).to(tl.uint8))
    else:
        # two planes: high 4 bits packed like FP4 in bytes [0, K_pad/2), low 2 bits four to a byte after them
        lo, hi = tl.split(tl.reshape(b_c >> 2, (G // 2, 2)))
        o_b = i_g * (G // 2) + tl.arange(0, G // 2)
        tl.store(p_row + o_b, (lo | (hi << 4)).to(tl.uint8))
        r0, r1 = tl.split(tl.reshape(b_c & 3, (G // 4, 2, 2)))  # r0: codes 4j, 4j+2; r1: 4j+1, 4j+3
        c0, c2 = tl.split(r0)
        c1, c3 = tl.split(r1)
        o_l = K_pad // 2 + i_g * (G // 4) + tl.arange(0, G // 4)
        tl.store(p_row + o_l, (c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)).to(tl.uint8))


def fpx_quantize_triton(w, packed, scales, *, fmt, group_size: int) -> None:
    import torch  # noqa: PLC0415

    N, K = w.shape
    s = scales.view(torch.int16) if scales.dtype == torch.bfloat16 else scales
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}[scales.dtype]
    _fpx_quantize_fwd_kernel[(N, scales.shape[1])](
        w, packed, s, K, scales.shape[1] * group_size, w.stride(0), packed.stride(0), scales.stride(0),
        MAXV=fmt.max, G=group_size, BITS=fmt.bits, MAN=fmt.man_bits, EMIN=fmt.emin, IS_INT=fmt.is_int,
        SCALE_KIND=kind, num_warps=1 if group_size <= 64 else 2,
    )  # fmt: skip
