"""FP4 / FP6 / int4 quantized linear layers for DiTs: formats, quantizer, calibration, patch feature, checkpoints.

``ditkern.patch(model, quant="fp4" | "fp6" | "int4" | "w4a8" | "w6a8" | "w4a6" | ditkern.QuantConfig(...))``;
``ditkern.save_quantized`` / ``ditkern.load_quantized``; ``ditkern.quant.fuse_lora`` / ``unfuse_lora`` (peft LoRA
merged into quantized layers, re-quantized; and back); ``ditkern.quant.bit_counts`` (bits per weight over the
quantized layers, the blocks, all linears); ``ditkern.quant.default_skip`` (the layers the default list keeps). See
docs/quant.md.
"""

from ditkern.quant.calibrate import Calibration, calibrate
from ditkern.quant.checkpoint import load_quantized, save_quantized
from ditkern.quant.choose import choose_rounding
from ditkern.quant.config import PRESETS, QuantConfig
from ditkern.quant.lora import fuse_lora, unfuse_lora
from ditkern.formats import FORMATS, QuantizedWeight, dequantize, quantize

__all__ = [
    "QuantConfig",
    "PRESETS",
    "FORMATS",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "calibrate",
    "choose_rounding",
    "Calibration",
    "save_quantized",
    "load_quantized",
    "fuse_lora",
    "unfuse_lora",
    "bit_counts",
    "default_skip",
]


def __getattr__(name):  # bit_counts / default_skip live with the patch feature, which imports the patch engine
    if name in ("bit_counts", "default_skip"):
        from ditkern.quant import feature  # noqa: PLC0415

        return getattr(feature, name)
    raise AttributeError(f"module 'ditkern.quant' has no attribute {name!r}")
