"""The inline PTX the FP4/FP6 GEMMs run on a GPU (decoding four packed bytes per instruction), executed here by a
small emulator of the PTX instructions it uses and compared with the torch reference decode for every byte value.

The interpreter cannot run inline PTX (the kernels use the equivalent uint8 formulas there), so without this test the
GPU-only decode strings would be checked by GPU tests alone.
"""

from __future__ import annotations

import re
import struct

import pytest
import torch

from ditkern import formats as F
from ditkern.kernels.fpx_common import e4m3_constexprs
from ditkern.kernels.fpx_linear import weight16_asm

M32 = 0xFFFFFFFF


def _half_to_float(bits: int, kind: str) -> float:
    if kind == "bf16x2":
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def _float_to_half(v: float, kind: str) -> int:
    t = torch.tensor([v], dtype=torch.bfloat16 if kind == "bf16x2" else torch.float16)
    return int(t.view(torch.int16).item()) & 0xFFFF


def run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Execute the PTX subset (mov, shl, shr, and, or, prmt, fma.rn.{bf16x2,f16x2}) on 32-bit values."""
    regs: dict[str, int] = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for ins in asm.strip().strip("{}").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & M32
        elif op == "shr.b32":
            r = src[0] >> src[1]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "or.b32":
            r = src[0] | src[1]
        elif op == "prmt.b32":
            pool = src[0].to_bytes(4, "little") + src[1].to_bytes(4, "little")
            r = int.from_bytes(bytes(pool[(src[2] >> (4 * i)) & 7] for i in range(4)), "little")
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            kind = op.split(".")[-1]
            lanes = []
            for sh in (0, 16):
                a, b, c = ((x >> sh) & 0xFFFF for x in src)
                lanes.append(_float_to_half(_half_to_float(a, kind) * _half_to_float(b, kind)
                                            + _half_to_float(c, kind), kind))  # fmt: skip
            r = lanes[0] | lanes[1] << 16
        else:
            raise AssertionError(f"emulator lacks {op!r}")
        regs[d] = r
    return [regs[f"${i}"] for i in range(n_out)]


def _words():
    """All 256 byte values, four per 32-bit word."""
    return [int.from_bytes(bytes(range(i, i + 4)), "little") for i in range(0, 256, 4)]


@pytest.mark.parametrize("name", list(F.FORMATS))
def test_e4m3_ptx_equals_reference_images(name):
    fmt = F.FORMATS[name]
    c = e4m3_constexprs(fmt, use_asm=True)
    image = F.e4m3_image_bits(fmt)  # the reference E4M3 image of every code
    for w in _words():
        lo, hi = run_ptx(c["ASM_LO"], [w], 1)[0], run_ptx(c["ASM_HI"], [w], 1)[0]
        for i, b in enumerate(w.to_bytes(4, "little")):
            nib = (b & 15, b >> 4)
            got = ((lo >> 8 * i) & 255, (hi >> 8 * i) & 255)
            if fmt.bits == 4:
                assert got == (int(image[nib[0]]), int(image[nib[1]])), (name, b)
            else:  # FP6 high plane: the image of code (nibble << 2) with low bits 0
                assert got == (int(image[nib[0] << 2]), int(image[nib[1] << 2])), (name, b)
            if fmt.bits == 6:
                fields = [run_ptx(c[f"ASM_F{f}"], [w], 1)[0] >> 8 * i & 255 for f in range(4)]
                # field f: the image of the code whose low 2 bits are bits [2f, 2f+2) of the byte (sign and high
                # bits 0); ORed with the high plane's image it is the whole code's image
                assert fields == [int(image[(b >> 2 * f) & 3]) for f in range(4)], (name, b)


def _lanes(outs: list[int], i: int) -> int:
    """The 16-bit lane of byte ``i`` of the input word (bytes 0, 1 -> the first register, 2, 3 -> the second)."""
    return (outs[i // 2] >> (16 * (i % 2))) & 0xFFFF


@pytest.mark.parametrize("half", [False, True], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(F.FORMATS))
def test_weight_only_16bit_ptx_equals_reference_values(name, half):
    """Every code of every format through the weight-only decode strings equals its value exactly (sign of zero
    included). FP6: every high-plane nibble combined with every low-plane field."""
    fmt = F.FORMATS[name]
    values = fmt.values()
    kind = "f16x2" if half else "bf16x2"
    asm = weight16_asm(fmt, half)
    for w in _words():
        hi_lo, hi_hi = run_ptx(asm["LO"], [w], 2), run_ptx(asm["HI"], [w], 2)
        fields = [run_ptx(asm[f"F{f}"], [w], 2) for f in range(4)] if fmt.bits == 6 else None
        for i, b in enumerate(w.to_bytes(4, "little")):
            for nib, out in zip((b & 15, b >> 4), (hi_lo, hi_hi)):
                if fmt.bits == 4:
                    codes = [(nib, _lanes(out, i))]
                else:  # the high nibble with each possible low 2 bits (from byte b's fields)
                    codes = [((nib << 2) | ((b >> 2 * f) & 3), _lanes(out, i) | _lanes(fields[f], i)) for f in range(4)]
                for code, bits in codes:
                    if fmt.bits == 6:
                        bits = run_ptx(asm["FIN"], [bits], 1)[0] & 0xFFFF
                    got = _half_to_float(bits, kind)
                    assert got == float(values[code]) and (bits >> 15) == (code >> (fmt.bits - 1)), (name, b, code)
