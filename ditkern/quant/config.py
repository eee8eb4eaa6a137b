"""``ditkern.QuantConfig``: what ``ditkern.patch(model, quant=...)`` quantizes, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ditkern.formats import FORMATS, SCALE_DTYPES, check_group_size, get_format

ACTIVATIONS = {None: None, "fp8": "e4m3", "fp6": "fp6_e3m2"}  # option -> the activation grid of quantize_fp8
METHODS = ("absmax", "awq", "gptq", "adaround")
AUTO_FORMATS = ("auto4", "auto")  # per-layer choices: the 4-bit format; 4-bit or FP6 under a bits budget
PRESETS = {
    "fp4": dict(format="fp4_e2m1"),
    "int4": dict(format="int4"),
    "fp6": dict(format="fp6_e2m3"),
    "w4a8": dict(format="fp4_e2m1", activations="fp8"),
    "w6a8": dict(format="fp6_e2m3", activations="fp8"),
    "w4a6": dict(format="fp4_e2m1", activations="fp6"),
}


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of a DiT's linear layers.

    format:        "fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "int4", "auto4" (per layer the 4-bit format, FP4 or
                   int4, with the lower measured error: the output error on calibration inputs when ``calibration``
                   is given, else the weight error) or "auto" (the same, then layers upgraded to fp6_e2m3 where the
                   measured error drops most per extra bit, within ``bits``; needs ``bits``)
    group_size:    32, 64 or 128 weights along K share one scale
    scale_dtype:   "fp32", "bf16" or "e8m0" (power-of-two scales of the OCP MX spec, rounded up: nothing saturates)
    activations:   None (weight-only), "fp8" (per-token E4M3: W4A8 / W6A8), "fp6" (per-token FP6 E3M2 grid fed as
                   E4M3, FP4DiT's A6). FP8 needs compute capability >= (8, 9); below it the weight-only GEMM runs.
    skip:          fnmatch patterns of module paths (inside the transformer) kept in high precision; None = the
                   default list (the model-level embedders, final projection and final adaLN, by exact path outside
                   the block stack; the adaLN modulation of the first and last block unless ``keep_edge_adaln`` is
                   False), [] = quantize every linear layer
    keep_edge_adaln: with ``skip=None``, keep the first and last block's adaLN modulation linears in high precision
                   (buys 0.1-2.5 dB on the reference pipelines at 1.3-2.5 more bits per block weight:
                   bench/results/quant/skip_study); False: every block linear is quantized (4.5 bits per block weight)
    memory_budget: None, or the bytes the quantized layers' weights may take (int), or a fraction (float <= 1) of
                   their bf16 size: starting from ``format``, layers are upgraded (to fp6_e2m3, then kept in high
                   precision) where the measured error drops most per byte, while the total fits
    bits:          None, or a budget in bits per weight (scales included) over the quantized layers, counted as
                   ``ditkern.quant.bit_counts`` counts them: the ``memory_budget`` machinery with the budget
                   ``bits * weights / 8`` bytes (a layer the budget upgrades to high precision counts at its real
                   bits); not together with ``memory_budget``
    method:        "absmax" (per-group absmax scales), "awq" (activation-aware per-input-channel scaling searched
                   on the output error of calibration activations), "gptq" (error-compensating rounding with the
                   calibration rows' Hessian) or "adaround" (learned rounding on the format's grid with a per-group
                   scale search, :mod:`ditkern.quant.adaround`; :func:`ditkern.quant.choose_rounding` chooses each
                   layer's rounding on the pipeline's outputs); all need ``calibration``; layers without calibration
                   rows use absmax
    calibration:   a :class:`ditkern.quant.Calibration` from :func:`ditkern.quant.calibrate`
    fuse_adaln:    with FP8/FP6 activations, the adaLN norm modules (AdaLayerNormZero, ...Single, SD35...X) emit
                   their output's FP8 form in the same kernel, and the quantized layers that consume it (q/k/v, the
                   single-stream MLP) reuse it instead of quantizing again (same values: outputs are unchanged)
    """

    format: str = "fp4_e2m1"
    group_size: int = 64
    scale_dtype: str = "fp32"
    activations: str | None = None
    skip: tuple[str, ...] | None = None
    memory_budget: int | float | None = None
    bits: float | None = None
    method: str = "absmax"
    calibration: Any = field(default=None, repr=False, compare=False)
    fuse_adaln: bool = True
    keep_edge_adaln: bool = True

    def __post_init__(self):
        if self.format not in AUTO_FORMATS:
            try:
                get_format(self.format)
            except ValueError:
                raise ValueError(
                    f"QuantConfig.format={self.format!r} is not a known format; choose one of "
                    f"{', '.join([*FORMATS, *AUTO_FORMATS])}"
                ) from None
        unit_fmt = None if self.format in AUTO_FORMATS else get_format(self.format)
        try:
            check_group_size(self.group_size, unit_fmt, field="QuantConfig.group_size")
        except TypeError as exc:
            raise TypeError(str(exc)) from None
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantConfig.scale_dtype={self.scale_dtype!r} is not one of {SCALE_DTYPES}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"QuantConfig.activations={self.activations!r} is not one of None, 'fp8', 'fp6'")
        if self.skip is not None:
            if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
                raise TypeError(f"QuantConfig.skip must be None or a list of fnmatch patterns, got {self.skip!r}")
            object.__setattr__(self, "skip", tuple(self.skip))
        b = self.memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0):
            raise ValueError(
                f"QuantConfig.memory_budget={b!r} must be None, bytes (int > 0) or a fraction (0 < f <= 1)"
            )
        if isinstance(b, float) and b > 1:
            raise ValueError(f"QuantConfig.memory_budget={b!r}: a float is a fraction of the bf16 size, at most 1.0")
        bits = self.bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 32):
            raise ValueError(f"QuantConfig.bits={bits!r} must be None or bits per weight (a number in (0, 32])")
        if bits is not None and b is not None:
            raise ValueError(f"QuantConfig.bits={bits!r} and memory_budget={b!r}: give one budget, not both")
        if self.format == "auto" and bits is None:
            raise ValueError('QuantConfig.format="auto" chooses formats under a budget: give bits= (e.g. bits=4.6)')
        if not isinstance(self.keep_edge_adaln, bool):
            raise TypeError(f"QuantConfig.keep_edge_adaln must be True or False, got {self.keep_edge_adaln!r}")
        if not isinstance(self.fuse_adaln, bool):
            raise TypeError(f"QuantConfig.fuse_adaln must be True or False, got {self.fuse_adaln!r}")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is not one of {METHODS}")
        if self.method != "absmax" and self.calibration is None:
            raise ValueError(f"QuantConfig.method={self.method!r} needs calibration=ditkern.quant.calibrate(...)")

    @property
    def act_grid(self) -> str | None:
        return ACTIVATIONS[self.activations]

    def describe(self) -> str:
        a = {None: "", "fp8": " A8", "fp6": " A6"}[self.activations]
        b = "" if self.bits is None else f" <= {self.bits:g} bits"
        m = "" if self.method == "absmax" else f" {self.method}"
        return f"{self.format} g{self.group_size} {self.scale_dtype}-scales{a}{m}{b}"

    def calibration_record(self) -> dict:
        """What a checkpoint records of how its layers were chosen (``save_quantized``'s ``calibration`` entry; a
        config made by ``load_quantized`` gives back the loaded checkpoint's record)."""
        loaded = getattr(self, "_loaded_record", None)
        if loaded is not None:
            return dict(loaded)
        rec = {"method": self.method, "format": self.format, "group_size": self.group_size,
               "scale_dtype": self.scale_dtype, "bits": self.bits, "memory_budget": self.memory_budget}  # fmt: skip
        cal = self.calibration
        if cal is not None:
            rec["calibrated_layers"] = len(cal)
            rec["calibration_rows"] = sum(int(st.count) for st in cal.layers.values())
            if getattr(cal, "rounding", None) is not None:
                rec["rounding_choice"] = dict(cal.rounding)
        return rec


def as_quant_config(value) -> QuantConfig:
    """``PatchConfig.quant`` (a preset name or a QuantConfig) -> QuantConfig."""
    if isinstance(value, QuantConfig):
        return value
    if isinstance(value, str):
        if value in PRESETS:
            return QuantConfig(**PRESETS[value])
        if value in FORMATS or value == "auto4":  # "auto" needs bits=: a QuantConfig
            return QuantConfig(format=value)
        raise ValueError(f"quant={value!r} is not a preset ({', '.join(PRESETS)}), a format, or a QuantConfig")
    raise TypeError(f"quant must be a preset name or a ditkern.QuantConfig, got {type(value).__name__}")
