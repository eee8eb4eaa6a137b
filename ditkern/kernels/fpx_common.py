"""Triton helpers shared by the FP4/FP6 kernels: code unpacking, decoding, exact grid rounding, scale loading.

All conversions are integer/bit arithmetic or exact power-of-two products, so they are bit-identical on a GPU and in
Triton's interpreter (whose fp32 -> fp8 / bf16 casts round wrongly, see shared/TRITON_CPU.md), and they reproduce the
torch reference in ``ditkern/quant/formats.py`` exactly. The packed layout is documented there.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

# 1.5 * 2**23: (v + RNE_MAGIC) - RNE_MAGIC rounds fp32 |v| < 2**22 to the nearest integer, ties to even.
# A constexpr: a plain module-level float inside a @triton.jit function runs in the interpreter but fails to compile
# on every GPU ("Cannot access global variable"); tests/test_compile.py compiles these kernels for sm_80..sm_100a.
RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def load_codes(p_row, o_kb, m_n, K_pad, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` (int32) of rows ``p_row`` (``[BLOCK_N, 1]`` pointers to each row's packed bytes),
    starting at code ``o_kb`` (a multiple of BLOCK_K, itself a multiple of the packing unit). FP6 reads its two
    planes (high 4 bits at byte ``o_kb / 2``, low 2 bits at ``K_pad / 2 + o_kb / 4``): contiguous runs of bytes."""
    o_b = o_kb // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(p_row + o_b[None, :], mask=m_n, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K // 2]
    c = tl.interleave(b & 15, b >> 4)
    if BITS == 6:
        o_l = K_pad // 2 + o_kb // 4 + tl.arange(0, BLOCK_K // 4)
        lb = tl.load(p_row + o_l[None, :], mask=m_n, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K // 4]
        # interleave(interleave(f0, f2), interleave(f1, f3)) = f0 f1 f2 f3 f0 f1 ... (code order along K)
        lo = tl.interleave(tl.interleave(lb & 3, (lb >> 4) & 3), tl.interleave((lb >> 2) & 3, lb >> 6))
        c = (c << 2) | lo
    return c


# ---- E4M3 images by shifts and masks, four bytes per instruction on a GPU ------------------------------------------
# A packed byte holds two codes (FP4 / int4, or FP6's high 4 bits). The E4M3 image of a code puts its sign in bit 7
# and its magnitude bits under E4M3's exponent and mantissa: a shift by SH (FP4: 3 - MAN; int4: 0, the subnormal
# mantissa; FP6's top three magnitude bits: 5 - MAN) and a mask. Both operations act on each byte alone, so a GPU does
# four bytes per 32-bit instruction (SWAR; ``tl.inline_asm_elementwise`` with pack=4); the interpreter, which cannot
# run PTX, evaluates the same formulas on uint8 tensors. FP6's low 2 bits (four to a byte) shift by 3 - MAN.
def swar_asm(sh: int) -> tuple[str, str]:
    """PTX for the low- and high-nibble images (sign to bit 7, the 3 magnitude bits shifted to bit ``sh``)."""
    mask = f"0x{(7 << sh) * 0x01010101:08X}"
    lo = (f"{{ .reg .b32 t0, t1; shl.b32 t0, $1, 4; shl.b32 t1, $1, {sh}; and.b32 t0, t0, 0x80808080; "
          f"and.b32 t1, t1, {mask}; or.b32 $0, t0, t1; }}")  # fmt: skip
    hi = (f"{{ .reg .b32 t0, t1; shr.b32 t1, $1, {4 - sh}; and.b32 t0, $1, 0x80808080; "
          f"and.b32 t1, t1, {mask}; or.b32 $0, t0, t1; }}")  # fmt: skip
    return lo, hi


def swar_asm_fields(sl: int) -> tuple[str, ...]:
    """PTX for FP6's low-2-bit fields ``i = 0..3`` of each byte, shifted to bit ``sl``."""
    return tuple(f"{{ .reg .b32 t0; shr.b32 t0, $1, {2 * i}; and.b32 t0, t0, 0x03030303; shl.b32 $0, t0, {sl}; }}"
                 for i in range(4))  # fmt: skip


@triton.jit
def _nibble_images(b, SH: tl.constexpr, ASM_LO: tl.constexpr, ASM_HI: tl.constexpr, USE_ASM: tl.constexpr):
    if USE_ASM:
        lo = tl.inline_asm_elementwise(ASM_LO, "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(ASM_HI, "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        m = (7 << SH) & 0xFF
        lo = ((b << 4) & 0x80) | ((b << SH) & m)
        lo = lo.to(tl.uint8)
        hi = ((b & 0x80) | ((b >> (4 - SH)) & m)).to(tl.uint8)
    return tl.interleave(lo, hi)


@triton.jit
def _field(lb, I: tl.constexpr, SL: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    if USE_ASM:
        return tl.inline_asm_elementwise(ASM, "=r,r", [lb], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        return (((lb >> (2 * I)) & 3) << SL).to(tl.uint8)


@triton.jit
def load_e4m3(p_row, o_kb, m_n, K_pad, BITS: tl.constexpr, BLOCK_K: tl.constexpr, SH: tl.constexpr,
              SL: tl.constexpr, ASM_LO: tl.constexpr, ASM_HI: tl.constexpr, ASM_F0: tl.constexpr,
              ASM_F1: tl.constexpr, ASM_F2: tl.constexpr, ASM_F3: tl.constexpr, USE_ASM: tl.constexpr):  # fmt: skip
    """E4M3 images ``[BLOCK_N, BLOCK_K]`` (the codes of :func:`load_codes`, each ``value * 2**-e4m3_shift``)."""
    o_b = o_kb // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(p_row + o_b[None, :], mask=m_n, other=0)  # [BLOCK_N, BLOCK_K // 2] uint8
    img = _nibble_images(b, SH, ASM_LO, ASM_HI, USE_ASM)
    if BITS == 6:
        o_l = K_pad // 2 + o_kb // 4 + tl.arange(0, BLOCK_K // 4)
        lb = tl.load(p_row + o_l[None, :], mask=m_n, other=0)  # [BLOCK_N, BLOCK_K // 4] uint8
        f0 = _field(lb, 0, SL, ASM_F0, USE_ASM)
        f1 = _field(lb, 1, SL, ASM_F1, USE_ASM)
        f2 = _field(lb, 2, SL, ASM_F2, USE_ASM)
        f3 = _field(lb, 3, SL, ASM_F3, USE_ASM)
        img = img | tl.interleave(tl.interleave(f0, f2), tl.interleave(f1, f3))
    return img.to(tl.float8e4nv, bitcast=True)


@functools.lru_cache(maxsize=None)  # per (format, mode): a launch reuses the strings
def e4m3_constexprs(fmt, use_asm: bool) -> dict:
    """The constexpr arguments of :func:`load_e4m3` for a format (``use_asm``: False under the interpreter)."""
    if fmt.bits == 4:
        sh, sl = (0 if fmt.is_int else 3 - fmt.man_bits), 0
    else:
        sh, sl = 5 - fmt.man_bits, 3 - fmt.man_bits
    lo, hi = swar_asm(sh)
    f = swar_asm_fields(sl)
    return dict(SH=sh, SL=sl, ASM_LO=lo, ASM_HI=hi, ASM_F0=f[0], ASM_F1=f[1], ASM_F2=f[2], ASM_F3=f[3],
                USE_ASM=use_asm)  # fmt: skip


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
