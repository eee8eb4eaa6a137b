"""Low-bit weight formats, their exact reference quantizer, and the packed layout the GEMMs read.

Below the ops and kernels (which read these definitions) and above nothing but torch; ``ditkern.quant.formats``
re-exports it for users' imports.

Formats (OCP Microscaling element formats, no inf/NaN; plus symmetric int4):

=========  ====  ========  ====  =========================================  =========
name       bits  exp/man   bias  magnitudes                                 max
=========  ====  ========  ====  =========================================  =========
fp4_e2m1   4     2 / 1     1     0, .5, 1, 1.5, 2, 3, 4, 6                  6
fp6_e3m2   6     3 / 2     3     0, .0625 ... 28 (subnormal step 1/16)      28
fp6_e2m3   6     2 / 3     1     0, .125 ... 7.5 (subnormal step 1/8)       7.5
int4       4     -         -     0..7 (symmetric, -8 unused)                7
=========  ====  ========  ====  =========================================  =========

Every code is ``sign bit | magnitude bits`` (sign-magnitude, the MSB is the sign for all four formats, so int4's
"-0" code 0b1000 decodes to -0.0 and is never produced for a non-zero weight). Every value of every format is exactly
representable in FP8 E4M3 (at most 3 mantissa bits, binary exponents in [-4, 4]), which is what lets the W4A8/W6A8
GEMM feed the codes to FP8 tensor cores without error. For the float formats the E4M3 *bit pattern* of
``value * 2**-(7 - bias)`` is simply ``sign << 7 | magnitude << (3 - man_bits)`` (E4M3's subnormals line up with the
format's subnormals), so the GEMM expands a code with two shifts and folds the power of two ``2**(7 - bias)`` into
its epilogue. int4 magnitudes are converted (exactly) to E4M3 instead.

Quantization (per group of ``group_size`` consecutive weights along K, for each output row n)::

    scale[n, g] = absmax(W[n, g*G:(g+1)*G]) / max(format)     (1.0 for an all-zero group)
    scale       -> stored as fp32, bf16 (RNE) or E8M0 (the smallest power of two >= the fp32 scale, so that no
                   weight saturates: a deliberate deviation from the OCP MX rule floor(log2 amax) - emax, which clips)
    code[n, k]  = RNE onto the format's grid of clamp(W[n, k] / stored_scale, -max, max)
    W_hat       = value(code) * stored_scale

Packed layout (chosen for the GEMM: a row of W is contiguous, K-major, like nn.Linear's ``[N, K]`` weight, so one
program reads a ``[BLOCK_N, BLOCK_K]`` tile as ``BLOCK_N`` contiguous byte runs):

* K is padded with zero codes up to ``K_pad``, a multiple of ``group_size``.
* FP4 / int4: ``packed[n, j]`` (uint8, ``[N, K_pad / 2]``) holds code ``k = 2j`` in its low nibble and ``k = 2j+1``
  in its high nibble.
* FP6 (uint8, ``[N, 3 * K_pad / 4]``): two bit planes per row, so that a GEMM's K tile of either plane is one
  contiguous run of bytes (16-byte vector loads) and decodes with the same shifts and masks as FP4. Bytes
  ``[0, K_pad / 2)`` hold the high four bits of each code (``code >> 2``) packed like FP4 (code ``2j`` in the low
  nibble of byte ``j``, ``2j+1`` in its high nibble); bytes ``[K_pad / 2, 3 * K_pad / 4)`` hold the low two bits, code
  ``k`` in bits ``[2 (k % 4), 2 (k % 4) + 2)`` of byte ``K_pad / 2 + k // 4``. This is layout 2 (checkpoint format
  ``ditkern-quant-2``); layout 1, four codes in three little-endian bytes (code ``4j + i`` in bits ``[6i, 6i + 6)`` of
  the 24-bit word of bytes ``3j .. 3j+2``), is what ``ditkern-quant-1`` checkpoints hold: ``unpack_layout1`` reads it
  and the checkpoint loader repacks it.
* scales: ``[N, K_pad / group_size]``, fp32, bf16, or uint8 holding the biased E8M0 exponent ``e + 127``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    exp_bits: int  # 0 for int4
    man_bits: int
    bias: int
    is_int: bool = False
    max_value: float | None = None  # E4M3 (fn) stops at 448, short of its top binade's last value

    @property
    def max(self) -> float:
        return self.max_value if self.max_value is not None else float(self.magnitudes()[-1])

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (floats)."""
        return 1 - self.bias

    @property
    def codes_per_unit(self) -> int:
        """Codes in one packing unit (FP4: 2 codes in a byte; FP6: 4 codes in 3 bytes)."""
        return 2 if self.bits == 4 else 4

    @property
    def bytes_per_unit(self) -> int:
        return 1 if self.bits == 4 else 3

    @property
    def e4m3_shift(self) -> int:
        """The E4M3 image used by the GEMM is ``value * 2**-e4m3_shift``: the code's magnitude bits under E4M3's
        exponent and mantissa, so one shift and mask make it (int4: its magnitude as E4M3's subnormal mantissa,
        ``m * 2**-9``)."""
        return 9 if self.is_int else 7 - self.bias

    def magnitudes(self) -> torch.Tensor:
        """All ``2**(bits-1)`` magnitudes in code order (ascending), float64, exact."""
        n = 1 << (self.bits - 1)
        if self.is_int:
            return torch.arange(n, dtype=torch.float64)
        out = []
        for c in range(n):
            e, m = c >> self.man_bits, c & ((1 << self.man_bits) - 1)
            if e == 0:
                out.append(m / (1 << self.man_bits) * 2.0 ** (1 - self.bias))
            else:
                out.append((1 + m / (1 << self.man_bits)) * 2.0 ** (e - self.bias))
        return torch.tensor(out, dtype=torch.float64)

    def values(self) -> torch.Tensor:
        """Value of every code ``0 .. 2**bits - 1`` (float64; the sign bit is the MSB)."""
        mag = self.magnitudes()
        return torch.cat([mag, -mag])


FORMATS: dict[str, Format] = {
    "fp4_e2m1": Format("fp4_e2m1", 4, 2, 1, 1),
    "fp6_e3m2": Format("fp6_e3m2", 6, 3, 2, 3),
    "fp6_e2m3": Format("fp6_e2m3", 6, 2, 3, 1),
    "int4": Format("int4", 4, 0, 0, 0, is_int=True),
}
FORMAT_IDS = {name: i for i, name in enumerate(FORMATS)}  # the integer the kernels take
SCALE_DTYPES = ("fp32", "bf16", "e8m0")
GROUP_SIZES = (32, 64, 128)


def get_format(name: str, field: str = "format") -> Format:
    if isinstance(name, Format):
        return name
    if name not in FORMATS:
        raise ValueError(f"{field}={name!r} is not a known format; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_group_size(group_size, fmt: Format | None = None, field: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{field} must be an int, got {type(group_size).__name__}")
    if group_size <= 0:
        raise ValueError(f"{field}={group_size} must be positive (one of {GROUP_SIZES})")
    unit = 4 if fmt is None else fmt.codes_per_unit
    if group_size % unit:
        raise ValueError(f"{field}={group_size} must be a multiple of the packing unit ({unit} codes)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{field}={group_size} is not supported; choose one of {GROUP_SIZES}")
    return group_size


def check_scale_dtype(scale_dtype: str, field: str = "scale_dtype") -> str:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{field}={scale_dtype!r} is not one of {SCALE_DTYPES}")
    return scale_dtype


def padded_k(K: int, group_size: int) -> int:
    return -(-K // group_size) * group_size


def bits_per_weight(fmt: str | Format, group_size: int, scale_dtype: str = "fp32") -> float:
    """Storage bits per weight including the per-group scales (K a multiple of the group size)."""
    fmt = get_format(fmt)
    return fmt.bits + {"fp32": 32, "bf16": 16, "e8m0": 8}[scale_dtype] / group_size


# ----------------------------------------------------------------------------------------------------------------------
# reference rounding onto a grid (exact: powers of two only, RNE from torch.round)
# ----------------------------------------------------------------------------------------------------------------------
def round_to_grid(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """RNE of fp32 ``v`` onto ``fmt``'s grid, saturating at +-max. Exact (fp32 in, fp32 out)."""
    v = v.float().clamp(-fmt.max, fmt.max)
    # "+ 0.0" turns -0.0 into +0.0: a value that rounds to zero gets the zero code, never "-0" (as the kernels do)
    if fmt.is_int:
        return torch.round(v) + 0.0
    _, ex = torch.frexp(v)  # v = m * 2**ex, |m| in [0.5, 1): floor(log2|v|) = ex - 1
    e = torch.clamp(ex - 1, min=fmt.emin)
    step = torch.ldexp(torch.ones_like(v), (e - fmt.man_bits).to(torch.int32))
    return torch.round(v / step) * step + 0.0


# the activation grid of the FP8 GEMMs (not a weight format: it is not in FORMATS)
E4M3 = Format("e4m3", 8, 4, 3, 7, max_value=448.0)
ACT_GRIDS = {"e4m3": E4M3, "fp6_e3m2": FORMATS["fp6_e3m2"], "fp6_e2m3": FORMATS["fp6_e2m3"]}


def encode(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes (uint8, one per element) of values already on ``fmt``'s grid."""
    mags = fmt.magnitudes().float()
    idx = torch.searchsorted(mags, q.abs().float().contiguous())
    if (idx >= len(mags)).any() or not torch.equal(mags[idx.clamp(max=len(mags) - 1)], q.abs().float()):
        raise ValueError(f"encode: values are not on the {fmt.name} grid")
    sign = torch.signbit(q).to(torch.uint8) << (fmt.bits - 1)
    return idx.to(torch.uint8) | sign


def decode(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """fp32 value of each code."""
    return fmt.values().float()[codes.long()]


def e4m3_image_bits(fmt: Format) -> torch.Tensor:
    """The E4M3 bit pattern (uint8) the FP8 GEMM uses for every code: that of ``value * 2**-e4m3_shift``."""
    codes = torch.arange(1 << fmt.bits)
    sign = (codes >> (fmt.bits - 1)) & 1
    mag = codes & ((1 << (fmt.bits - 1)) - 1)
    return ((sign << 7) | (mag << (0 if fmt.is_int else 3 - fmt.man_bits))).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# scales
# ----------------------------------------------------------------------------------------------------------------------
def store_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """fp32 scales -> their stored form (fp32, bf16, or uint8 biased E8M0 exponent rounding *up*)."""
    scale = scale.float()
    if scale_dtype == "fp32":
        return scale.contiguous()
    if scale_dtype == "bf16":
        return scale.to(torch.bfloat16).contiguous()
    m, ex = torch.frexp(scale)  # scale = m * 2**ex, m in [0.5, 1): ceil(log2 scale) = ex - (m == 0.5)
    e = ex - (m == 0.5).to(ex.dtype)
    return (e.clamp(-126, 127) + 127).to(torch.uint8).contiguous()


def load_scale(stored: torch.Tensor) -> torch.Tensor:
    """Stored scales -> fp32."""
    if stored.dtype == torch.uint8:
        return torch.ldexp(torch.ones(stored.shape, device=stored.device), stored.to(torch.int32) - 127)
    return stored.float()


def scale_kind(stored: torch.Tensor) -> int:
    """0: fp32, 1: bf16, 2: e8m0 (the integer the kernels take)."""
    return {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}[stored.dtype]


# ----------------------------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``[N, K]`` uint8 codes (K a multiple of the packing unit) -> packed bytes, see the module docstring."""
    N, K = codes.shape
    if K % fmt.codes_per_unit:
        raise ValueError(f"pack: K={K} is not a multiple of {fmt.codes_per_unit} ({fmt.name})")
    c = codes.to(torch.int32)
    if fmt.bits == 4:
        c = c.view(N, K // 2, 2)
        return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).contiguous()
    hi = (c >> 2).view(N, K // 2, 2)
    lo = (c & 3).view(N, K // 4, 4)
    hi_plane = hi[..., 0] | (hi[..., 1] << 4)
    lo_plane = lo[..., 0] | (lo[..., 1] << 2) | (lo[..., 2] << 4) | (lo[..., 3] << 6)
    return torch.cat([hi_plane, lo_plane], 1).to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[N, K_pad]`` uint8 codes."""
    N = packed.shape[0]
    p = packed.to(torch.int32)
    if fmt.bits == 4:
        return torch.stack([p & 0xF, p >> 4], -1).reshape(N, -1).to(torch.uint8)
    K = p.shape[1] // 3 * 4
    hi = torch.stack([p[:, : K // 2] & 0xF, p[:, : K // 2] >> 4], -1).reshape(N, K)
    lo = torch.stack([(p[:, K // 2 :] >> (2 * i)) & 3 for i in range(4)], -1).reshape(N, K)
    return ((hi << 2) | lo).to(torch.uint8)


def unpack_layout1(packed: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes ``[N, K_pad]`` of a packed tensor in layout 1 (``ditkern-quant-1`` checkpoints; FP6 only differs)."""
    if fmt.bits == 4:
        return unpack(packed, fmt)
    N = packed.shape[0]
    p = packed.to(torch.int32).view(N, -1, 3)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    return torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], -1).reshape(N, -1).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# quantize / dequantize (the reference semantics)
# ----------------------------------------------------------------------------------------------------------------------
def absmax_scales(w: torch.Tensor, fmt: Format, group_size: int) -> torch.Tensor:
    """fp32 ``[N, K_pad / G]`` absmax scales (1.0 for all-zero groups)."""
    N, K = w.shape
    Kp = padded_k(K, group_size)
    wf = torch.nn.functional.pad(w.float(), (0, Kp - K)).view(N, Kp // group_size, group_size)
    amax = wf.abs().amax(-1)
    return torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))


def quantize_codes(w: torch.Tensor, fmt: Format, group_size: int, stored_scales: torch.Tensor) -> torch.Tensor:
    """``[N, K_pad]`` codes of ``w`` with the given stored scales."""
    N, K = w.shape
    Kp = padded_k(K, group_size)
    s = load_scale(stored_scales).repeat_interleave(group_size, dim=1)  # [N, Kp]
    wf = torch.nn.functional.pad(w.float(), (0, Kp - K))
    return encode(round_to_grid(wf / s, fmt), fmt)


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    bad = ~torch.isfinite(w)
    if bad.any():
        n = int(bad.sum())
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {n} non-finite value(s) (first at index {idx}: {w[idx].item()}); cannot quantize")


@dataclass
class QuantizedWeight:
    """A packed low-bit ``[N, K]`` weight: codes in the GEMM layout + per-group scales (+ optional smoothing).

    ``smooth`` (``[K]`` fp32 or None) is the activation-aware per-input-channel factor: the stored codes quantize
    ``W * smooth`` (columns), and the layer computes ``(x * (1 / smooth)) @ W_hat.T`` (see :func:`inv_smooth`).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    format: str
    group_size: int
    shape: tuple[int, int]
    smooth: torch.Tensor | None = None

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def nbytes(self) -> int:
        n = self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()
        if self.smooth is not None:
            n += self.smooth.numel() * self.smooth.element_size()
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` weight ``value(code) * scale`` (times ``1 / smooth`` along K when present)."""
        return dequantize(self, dtype)

    def to(self, device) -> "QuantizedWeight":
        sm = None if self.smooth is None else self.smooth.to(device)
        return QuantizedWeight(self.packed.to(device), self.scales.to(device), self.format, self.group_size,
                               self.shape, sm)  # fmt: skip


def quantize(
    w: torch.Tensor,
    format: str = "fp4_e2m1",
    group_size: int = 64,
    scale_dtype: str = "fp32",
    *,
    scales: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Reference quantizer: ``[N, K]`` weight -> :class:`QuantizedWeight` (absmax scales unless ``scales`` (fp32,
    ``[N, K_pad / G]``) are given). Non-finite weights raise naming ``name``; values beyond the range saturate."""
    fmt = get_format(format)
    check_group_size(group_size, fmt)
    check_scale_dtype(scale_dtype)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_finite(w, name)
    wf = w.float()
    if smooth is not None:
        wf = wf * smooth.float()[None, :]
    if scales is None:
        scales = absmax_scales(wf, fmt, group_size)
    stored = store_scale(scales, scale_dtype)
    codes = quantize_codes(wf, fmt, group_size, stored)
    sm = None if smooth is None else smooth.float().contiguous()
    return QuantizedWeight(pack(codes, fmt), stored, fmt.name, group_size, (w.shape[0], w.shape[1]), sm)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt = q.fmt
    N, K = q.shape
    codes = unpack(q.packed, fmt)
    s = load_scale(q.scales).repeat_interleave(q.group_size, dim=1)
    w = (decode(codes, fmt) * s)[:, :K]
    if q.smooth is not None:
        w = w * inv_smooth(q.smooth)[None, :]
    return w.to(dtype)


def inv_smooth(smooth: torch.Tensor | None) -> torch.Tensor | None:
    """The ``[K]`` fp32 factor the activations are multiplied by (the kernels multiply, they do not divide)."""
    return None if smooth is None else (1.0 / smooth.float()).contiguous()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's measure for quantized ops)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)
