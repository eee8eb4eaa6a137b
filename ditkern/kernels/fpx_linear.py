"""Triton weight-only FP4/FP6/int4 GEMM: ``out = (x * inv_smooth) @ W_hat.T + bias`` for bf16/fp16/fp32 x.

``W_hat[n, k] = value(code[n, k]) * scale[n, k // G]``. Codes (packed layout: ``ditkern/quant/formats.py``) are
unpacked and decoded to exact values in registers, cast to x's dtype (every code value is exact in fp16 and bf16),
and multiplied on tensor cores with fp32 accumulation; the per-group scale multiplies each K tile's partial product
outside the dot (BLOCK_K divides G, so one tile lies in one group), the way FP8 GEMMs apply block scales. This is
the memory-bound small-M path: it reads 4-6.5 bits per weight instead of 16. Layout: x ``[M, K]`` (any row stride,
unit stride along K), out ``[M, N]``. FP4DiT (arXiv 2503.15465) motivates the float formats.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from ditkern.kernels.fpx_common import decode_f32, format_constexprs, load_codes, load_scales


@triton.jit
def _fpx_linear_fwd_kernel(
    X, PACKED, SCALES, BIAS, INV_SMOOTH, OUT,
    M, N, K, K_pad,
    stride_xm, stride_pn, stride_sn, stride_om,
    G: tl.constexpr,
    BITS: tl.constexpr, MAN: tl.constexpr, BIAS_EXP: tl.constexpr, IS_INT: tl.constexpr,
    SCALE_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ASM_LO: tl.constexpr, ASM_HI: tl.constexpr, ASM_F0: tl.constexpr, ASM_F1: tl.constexpr, ASM_F2: tl.constexpr,
    ASM_F3: tl.constexpr, ASM_FIN: tl.constexpr, USE_ASM: tl.constexpr,
):  # fmt: skip
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = o_m < M, o_n < N
    p_x = X + o_m[:, None].to(tl.int64) * stride_xm
    p_w = PACKED + o_n[:, None].to(tl.int64) * stride_pn
    p_s = SCALES + o_n.to(tl.int64) * stride_sn
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K_pad, BLOCK_K):
        o_k = kb + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_SMOOTH:
            b_is = tl.load(INV_SMOOTH + o_k, mask=o_k < K, other=0.0)
            b_x = (b_x.to(tl.float32) * b_is[None, :]).to(X.dtype.element_ty)
        if USE_ASM:  # codes -> bf16 / fp16 pairs by shifts and masks (weight16_asm), on a GPU only
            o_b = kb // 2 + tl.arange(0, BLOCK_K // 2)
            b_b = tl.load(p_w + o_b[None, :], mask=m_n[:, None], other=0)  # [BLOCK_N, BLOCK_K // 2] uint8
            if BITS == 4:
                b_lo = tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [b_b], dtype=X.dtype.element_ty, is_pure=True,
                                                 pack=4)  # fmt: skip
                b_hi = tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [b_b], dtype=X.dtype.element_ty, is_pure=True,
                                                 pack=4)  # fmt: skip
                b_w = tl.interleave(b_lo, b_hi)
            else:  # FP6: 16-bit images of the high plane's and the low plane's bits, ORed, then one FMA
                b_lo = tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [b_b], dtype=tl.int16, is_pure=True, pack=4)
                b_hi = tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [b_b], dtype=tl.int16, is_pure=True, pack=4)
                o_l = K_pad // 2 + kb // 4 + tl.arange(0, BLOCK_K // 4)
                b_l = tl.load(p_w + o_l[None, :], mask=m_n[:, None], other=0)  # [BLOCK_N, BLOCK_K // 4] uint8
                f0 = tl.inline_asm_elementwise(ASM_F0, "=r,=r,r", [b_l], dtype=tl.int16, is_pure=True, pack=4)
                f1 = tl.inline_asm_elementwise(ASM_F1, "=r,=r,r", [b_l], dtype=tl.int16, is_pure=True, pack=4)
                f2 = tl.inline_asm_elementwise(ASM_F2, "=r,=r,r", [b_l], dtype=tl.int16, is_pure=True, pack=4)
                f3 = tl.inline_asm_elementwise(ASM_F3, "=r,=r,r", [b_l], dtype=tl.int16, is_pure=True, pack=4)
                img = tl.interleave(b_lo, b_hi) | tl.interleave(tl.interleave(f0, f2), tl.interleave(f1, f3))
                b_w = tl.inline_asm_elementwise(ASM_FIN, "=r,r", [img], dtype=X.dtype.element_ty, is_pure=True,
                                                pack=2)  # fmt: skip
        else:
            b_c = load_codes(p_w, kb, m_n[:, None], K_pad, BITS, BLOCK_K)  # [BLOCK_N, BLOCK_K]
            b_w = decode_f32(b_c, BITS, MAN, BIAS_EXP, IS_INT).to(X.dtype.element_ty)
        if IEEE:
            b_p = tl.dot(b_x, tl.trans(b_w), input_precision="ieee")
        else:
            b_p = tl.dot(b_x, tl.trans(b_w))  # [BLOCK_M, BLOCK_N] fp32
        b_s = load_scales(p_s + kb // G, m_n, SCALE_KIND)  # [BLOCK_N]
        b_acc += b_p * b_s[None, :]
    if HAS_BIAS:
        b_acc += tl.load(BIAS + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_o = OUT + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :]
    tl.store(p_o, b_acc.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def _blocks(M: int, group_size: int, interpreted: bool) -> tuple[int, int, int]:
    # BLOCK_K divides the group so one scale covers a K tile. On a GPU 64 x 128 tiles, 4 warps, 4 stages: the group
    # scales are then pipelined with the tiles (no plain load in the main loop) and ~210 registers leave room for two
    # programs per SM (bench/results/static/90a.md). Under the interpreter cost is per program and loop step, so
    # tiles are as large as the shapes allow.
    bk = min(group_size, 128 if interpreted else 64)
    bm = max(16, min(64 if not interpreted else 128, triton.next_power_of_2(M)))
    return bm, 128, bk


def _bits16(v: float, half: bool) -> int:
    import torch  # noqa: PLC0415

    return int(torch.tensor(v, dtype=torch.float16 if half else torch.bfloat16).view(torch.int16).item()) & 0xFFFF


@functools.lru_cache(maxsize=None)  # built once per (format, dtype): launches reuse the strings
def weight16_asm(fmt, half: bool) -> dict[str, str]:
    """PTX making 16-bit (bf16, or fp16 if ``half``) weight values from packed bytes, two per 32-bit register.

    Each string spreads bytes into 16-bit lanes (``prmt``) and moves bits with shifts and masks:

    * FP4 E2M1 (``LO`` / ``HI``: the low / high nibbles of four bytes): the sign to bit 15, the three magnitude bits
      under the 16-bit format's exponent and mantissa, giving ``value * 2**-c`` (subnormal for 0.5), then one exact
      FMA by ``2**c`` (c = 127 - bias for bf16, 15 - bias for fp16; bf16x2 / f16x2 FMA keep subnormal inputs).
    * int4: the magnitude under a magic exponent (``128 + m`` in bf16, ``1024 + m`` in fp16), one exact FMA
      subtracting it, then the sign.
    * FP6: ``LO`` / ``HI`` give the sign and top three magnitude bits from the high plane, ``F0`` .. ``F3`` the low two
      bits (byte bits ``2f, 2f+1``) from the low plane, as 16-bit images; the kernel ORs them and ``FIN`` applies the
      FMA by ``2**c``.
    """
    ty = "f16x2" if half else "bf16x2"
    sh = (10 if half else 7) - fmt.man_bits  # bit of the magnitude's lowest bit in the 16-bit image

    def pair(v16: int) -> str:
        return f"0x{v16 * 0x10001:08X}"

    def shift(n: int) -> str:  # m = t moved by n bits
        return f"shl.b32 m, t, {n};" if n >= 0 else f"shr.b32 m, t, {-n};"

    def per_lane(body) -> str:
        """``body(reg)`` for the 16-bit lanes of bytes 0, 1 (into $0) and 2, 3 (into $1) of the input word $2."""
        return "".join(f"prmt.b32 t, $2, 0, {sel}; {body(reg)} " for reg, sel in (("$0", "0x4140"), ("$1", "0x4342")))

    def nibble(top: int, to: int, tail: str) -> str:
        """The nibble at bit ``top`` (0 or 4) of each byte: its sign to bit 15 (in s), its three magnitude bits to
        bit ``to`` (in m), then ``tail`` with the lane's output register for ``{reg}``."""
        return per_lane(lambda reg: f"shl.b32 s, t, {12 - top}; and.b32 s, s, 0x80008000; {shift(to - top)} "
                                    f"and.b32 m, m, {pair(7 << to)}; " + tail.format(reg=reg))  # fmt: skip

    c = _bits16(2.0 ** ((15 if half else 127) - fmt.bias), half)
    if fmt.is_int:
        magic = 1024.0 if half else 128.0
        consts = f"mov.b32 c, {pair(_bits16(1.0, half))}; mov.b32 z, {pair(_bits16(-magic, half))}; "
        tail, to = f"or.b32 m, m, {pair(_bits16(magic, half))}; fma.rn.{ty} m, m, c, z; or.b32 {{reg}}, m, s;", 0
    else:
        consts = f"mov.b32 c, {pair(c)}; mov.b32 z, 0x80008000; "
        if fmt.bits == 4:
            tail, to = f"or.b32 m, m, s; fma.rn.{ty} {{reg}}, m, c, z;", sh
        else:  # FP6's high plane: a 16-bit image, finished by FIN after the low plane's bits are ORed in
            tail, to = "or.b32 {reg}, m, s;", sh + 2
    head = "{ .reg .b32 t, s, m, c, z; " + consts
    out = {"LO": head + nibble(0, to, tail) + "}", "HI": head + nibble(4, to, tail) + "}"}
    if fmt.bits == 6:
        for f in range(4):
            out[f"F{f}"] = head + per_lane(lambda reg, f=f: f"{shift(sh - 2 * f)} and.b32 {reg}, m, {pair(3 << sh)};") + "}"
        out["FIN"] = head + f"fma.rn.{ty} $0, $1, c, z; }}"
    return out


def fpx_linear_triton(x2, packed, scales, bias, inv_smooth, out, *, fmt, group_size: int, K: int) -> None:
    """Launch on ``x2`` ``[M, K]`` (unit stride along K) into ``out`` ``[M, N]``; see ``ditkern.ops.fpx_linear``."""
    from ditkern._backend import triton_interpreted  # noqa: PLC0415
    from ditkern.formats import padded_k, scale_kind  # noqa: PLC0415

    M = x2.shape[0]
    N = packed.shape[0]
    interpreted = triton_interpreted()
    bm, bn, bk = _blocks(M, group_size, interpreted)
    kind = scale_kind(scales)
    s = scales.view(torch_int16()) if kind == 1 else scales
    c = format_constexprs(fmt)
    use_asm = not interpreted and x2.dtype in (torch_bf16(), torch_f16())
    asm = dict.fromkeys(("LO", "HI", "F0", "F1", "F2", "F3", "FIN"), "")
    if use_asm:
        asm.update(weight16_asm(fmt, x2.dtype == torch_f16()))  # (a copy: the cached dict is not changed)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _fpx_linear_fwd_kernel[grid](
        x2, packed, s, bias if bias is not None else out, inv_smooth if inv_smooth is not None else out, out,
        M, N, K, padded_k(K, group_size),
        x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        G=group_size, BITS=c["BITS"], MAN=c["MAN"], BIAS_EXP=c["BIAS"], IS_INT=c["IS_INT"],
        SCALE_KIND=kind, HAS_BIAS=bias is not None, HAS_SMOOTH=inv_smooth is not None,
        IEEE=x2.dtype == torch_float32(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1 if interpreted else 4,
        **{f"ASM_{k}": v for k, v in asm.items()}, USE_ASM=use_asm,
    )  # fmt: skip


def torch_int16():
    import torch  # noqa: PLC0415

    return torch.int16


def torch_float32():
    import torch  # noqa: PLC0415

    return torch.float32


def torch_bf16():
    import torch  # noqa: PLC0415

    return torch.bfloat16


def torch_f16():
    import torch  # noqa: PLC0415

    return torch.float16
