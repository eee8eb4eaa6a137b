"""Triton helpers shared by the FP4/FP6 kernels: code unpacking, decoding, exact grid rounding, scale loading.

All conversions are integer/bit arithmetic or exact power-of-two products, so they are bit-identical on a GPU and in
Triton's interpreter (whose fp32 -> fp8 / bf16 casts round wrongly, see shared/TRITON_CPU.md), and they reproduce the
torch reference in ``ditkern/quant/formats.py`` exactly. The packed layout is documented there.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 1.5 * 2**23: (v + RNE_MAGIC) - RNE_MAGIC rounds fp32 |v| < 2**22 to the nearest integer, ties to even.
# A constexpr: a plain module-level float inside a @triton.jit function runs in the interpreter but fails to compile
# on every GPU ("Cannot access global variable"); tests/test_compile.py compiles these kernels for sm_80..sm_100a.
RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def load_codes(p_row, o_kb, m_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` (int32) of rows ``p_row`` (``[BLOCK_N, 1]`` pointers to each row's packed bytes),
    starting at code ``o_kb`` (a multiple of BLOCK_K, itself a multiple of the packing unit)."""
    if BITS == 4:
        o_b = o_kb // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(p_row + o_b[None, :], mask=m_n, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K // 2]
        return tl.interleave(b & 15, b >> 4)
    else:
        o_b = o_kb // 4 * 3 + 3 * tl.arange(0, BLOCK_K // 4)
        b0 = tl.load(p_row + o_b[None, :], mask=m_n, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K // 4]
        b1 = tl.load(p_row + o_b[None, :] + 1, mask=m_n, other=0).to(tl.int32)
        b2 = tl.load(p_row + o_b[None, :] + 2, mask=m_n, other=0).to(tl.int32)
        c0 = b0 & 63
        c1 = (b0 >> 6) | ((b1 & 15) << 2)
        c2 = (b1 >> 4) | ((b2 & 3) << 4)
        c3 = b2 >> 2
        # interleave(interleave(c0, c2), interleave(c1, c3)) = c0 c1 c2 c3 c0 c1 ... (code order along K)
        return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))


@triton.jit
def decode_f32(code, BITS: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, IS_INT: tl.constexpr):
    """Exact fp32 value of each code. Floats: the code's magnitude bits placed under fp16's exponent/mantissa give
    ``value * 2**-(15 - BIAS)`` (fp16 subnormals line up with the format's), rescaled by an exact power of two."""
    sign = (code >> (BITS - 1)) & 1
    mag = code & ((1 << (BITS - 1)) - 1)
    if IS_INT:
        v = mag.to(tl.float32)
    else:
        h = (mag << (10 - MAN)).to(tl.int16).to(tl.float16, bitcast=True)
        v = h.to(tl.float32) * (2.0 ** (15 - BIAS))
    return tl.where(sign == 1, -v, v)


@triton.jit
def decode_e4m3(code, BITS: tl.constexpr, MAN: tl.constexpr, IS_INT: tl.constexpr):
    """E4M3 image of each code: floats give the bit pattern of ``value * 2**-(7 - BIAS)`` (two shifts), int4 its
    value (an exact cast: the values 0..7 need no rounding)."""
    if IS_INT:
        sign = (code >> 3) & 1
        v = (code & 7).to(tl.float32)
        return tl.where(sign == 1, -v, v).to(tl.float8e4nv)
    else:
        sign = (code >> (BITS - 1)) & 1
        mag = code & ((1 << (BITS - 1)) - 1)
        return ((sign << 7) | (mag << (3 - MAN))).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def load_scales(p, mask, SCALE_KIND: tl.constexpr):
    """fp32 scales from fp32 (0), bf16 passed as int16 (1) or E8M0 biased exponents in uint8 (2)."""
    if SCALE_KIND == 0:
        return tl.load(p, mask=mask, other=0.0)
    elif SCALE_KIND == 1:
        b = tl.load(p, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (b << 16).to(tl.float32, bitcast=True)
    else:
        b = tl.load(p, mask=mask, other=127).to(tl.int32)
        return (b << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_grid(v, MAN: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr, IS_INT: tl.constexpr):
    """RNE of fp32 ``v`` onto a float grid (MAN mantissa bits, smallest normal exponent EMIN) or the integers,
    saturating at +-MAXV. Exact: the binade comes from the exponent bits, the step is a power of two.
    NaN stays NaN, as in the torch reference: the GPU's min/max return the non-NaN operand (NaN would saturate to
    +-MAXV), so the clamp propagates NaN explicitly."""
    v = tl.where(v != v, v, tl.minimum(tl.maximum(v, -MAXV), MAXV))
    if IS_INT:
        return (v + RNE_MAGIC) - RNE_MAGIC
    else:
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, EMIN)
        step = ((e - MAN + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - e + MAN) << 23).to(tl.float32, bitcast=True)
        r = v * inv_step
        r = (r + RNE_MAGIC) - RNE_MAGIC
        return r * step


@triton.jit
def to_e4m3(v):
    """fp32 values already on the E4M3 grid (or NaN) as float8e4nv. The cast is exact for grid values on a GPU and in
    the interpreter; NaN is written as 0x7F explicitly (torch's and the GPU's NaN; the interpreter would give 0x7C)."""
    bits = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(v != v, 0x7F, bits).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def encode_code(q, BITS: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, IS_INT: tl.constexpr):
    """Code (int32) of an fp32 value already on the grid (the inverse of ``decode_f32``)."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(q)
    if IS_INT:
        mag = a.to(tl.int32)
    else:
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        # subnormal codes: a / 2**(EMIN - MAN); normal: exponent field e - EMIN + 1, then the top MAN mantissa bits
        sub = (a * (2.0 ** (MAN - EMIN))).to(tl.int32)
        man = (a.to(tl.int32, bitcast=True) >> (23 - MAN)) & ((1 << MAN) - 1)
        mag = tl.where(e < EMIN, sub, ((e - EMIN + 1) << MAN) | man)
    return (sign << (BITS - 1)) | mag


def format_constexprs(fmt) -> dict:
    """The constexpr arguments the kernels take for a :class:`ditkern.quant.formats.Format`."""
    return dict(BITS=fmt.bits, MAN=fmt.man_bits, BIAS=fmt.bias, IS_INT=fmt.is_int)
