"""FP4 / FP6 / int4 quantized linear layers for DiTs: formats, quantizer, calibration, patch feature, checkpoints.

``ditkern.patch(model, quant="fp4" | "fp6" | "int4" | "w4a8" | "w6a8" | "w4a6" | ditkern.QuantConfig(...))``;
``ditkern.save_quantized`` / ``ditkern.load_quantized``. See docs/quant.md.
"""

from ditkern.quant.calibrate import Calibration, calibrate
from ditkern.quant.checkpoint import load_quantized, save_quantized
from ditkern.quant.config import PRESETS, QuantConfig
from ditkern.formats import FORMATS, QuantizedWeight, dequantize, quantize

__all__ = [
    "QuantConfig",
    "PRESETS",
    "FORMATS",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "calibrate",
    "Calibration",
    "save_quantized",
    "load_quantized",
]
